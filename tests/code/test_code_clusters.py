"""Compiler messages normalised and clustered (lightning_edit/code/clusters.py)."""

from lightning_edit.code.clusters import OTHER, ErrorClusters, declared_names, normalise, signature

PROGRAM = "int countChar ( String text , char c ) { int n = text . length ; int k = 0 ; return k ; }"


def test_declared_names_are_the_programs_own():
    assert declared_names(PROGRAM) == {"countChar", "text", "c", "n", "k"}
    # `return k` and `cast ( int ) s` declare nothing; array types do
    assert declared_names("int f ( int [ ] a ) { return cast ( int ) a . length ; }") == {"f", "a"}


def test_paths_lines_names_and_literals_are_normalised():
    names = declared_names(PROGRAM)
    a = normalise("prog_3.d(4): Error: cannot implicitly convert expression `text.length` of type `ulong` to `int`", names)
    b = normalise("/tmp/x/prog_17.d(12,5): Error: cannot implicitly convert expression `arr.length` of type `ulong` "
                  "to `int`", {"arr"})
    assert a == b == "cannot implicitly convert expression `<id>.length` of type `ulong` to `int`"
    assert normalise("p.d(1): Error: cannot implicitly convert expression `x * 2L` of type `long` to `int`", {"x"}) == \
        "cannot implicitly convert expression `<id> * <num>` of type `long` to `int`"
    assert normalise('p.d(2): Error: cannot implicitly convert expression `"abc"` of type `string` to `int`') == \
        "cannot implicitly convert expression `<str>` of type `string` to `int`"
    assert normalise("test_9.d(6): Error: function `prog_9.countChar(string text, char c)` is not callable", names) \
        == "function `<module>.<id>(string <id>, char <id>)` is not callable"


def test_undeclared_names_are_what_the_error_is_about():
    # String / boolean are not the program's names: they stay, and make two clusters
    names = declared_names(PROGRAM)
    s = normalise("prog_0.d(2): Error: undefined identifier `String`, did you mean alias `string`?", names)
    b = normalise("prog_5.d(3): Error: undefined identifier `boolean`", names)
    assert s == "undefined identifier `String`, did you mean alias `string`?"
    assert b == "undefined identifier `boolean`"
    # a declared name that is missing (the function under test, renamed by the LM) is a name
    assert normalise("test_1.d(6): Error: undefined identifier `countChar`", names) == "undefined identifier `<id>`"


def test_first_error_is_the_signature():
    errors = ["prog_1.d(3): Error: undefined identifier `boolean`", "prog_1.d(4): Error: undefined identifier `q`"]
    assert signature(errors) == "undefined identifier `boolean`"
    assert signature([]) is None


def test_clusters_by_size_with_a_floor():
    sigs = ["A"] * 5 + ["B"] * 3 + ["C"] * 2 + [None] * 4 + ["D"]
    clusters = ErrorClusters(min_size=3).fit(sigs)
    assert clusters.ids == {"A": "c0", "B": "c1"}
    assert clusters.sizes == {"c0": 5, "c1": 3, OTHER: 3}
    assert [clusters.assign(s) for s in ("A", "B", "C", "never seen", None)] == ["c0", "c1", OTHER, OTHER, None]
    again = ErrorClusters.from_json(clusters.to_json())
    assert again.ids == clusters.ids and again.sizes == clusters.sizes
