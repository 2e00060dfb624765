"""`make demo`: train the tiny model on the default corpus (the Python standard library), sample from it,
then print the parameter table of every preset."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from deepmoe.backend.compile_cache import use_compilation_cache
    from deepmoe.backend.host_memory import keep_host_buffers
    from deepmoe.info import parameter_table

    keep_host_buffers()
    use_compilation_cache()  # a second demo loads its programs instead of compiling them
    from deepmoe.train.demo import main as train_and_sample

    code = train_and_sample(argv)
    print("\nPresets (parameters counted from their descriptions, nothing allocated):")
    print(parameter_table())
    return code


if __name__ == "__main__":
    sys.exit(main())
