"""`python -m lightning_edit.world [--name toyworld] [--seed 0] [--force]`: build a world, print its accuracy."""

import argparse
import json

from . import WORLD_NAMES, build_world


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_edit.world", description=__doc__)
    parser.add_argument("--name", default="toyworld", choices=WORLD_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="default: $LIGHTNING_EDIT_CACHE or ~/.cache/lightning_edit")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    world = build_world(args.name, seed=args.seed, cache_dir=args.cache_dir, force=args.force)
    acc = world.accuracy
    print(json.dumps({k: acc[k] for k in ("name", "seed", "accuracy", "per_relation", "trained_pairs",
                                          "held_out_pairs", "n_prompts", "epochs", "build_seconds", "sizes")},
                     indent=1))
    print(f"world: {world.root}")


if __name__ == "__main__":
    main()
