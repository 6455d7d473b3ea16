"""Code-error editing on an embedded code world: Java -> D programs from templates, a tiny code LM
that reproduces real `ldc2` errors in clusters, a sandboxed compile-and-test harness, and the KECode
(seeds/000) and MENT (seeds/001) benchmarks. See `world.py` for the world, `job.py` for the runs.

Heavy parts (torch, transformers, the compiler) are imported by the modules that need them; importing
this package is cheap.
"""
