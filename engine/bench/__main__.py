"""`python -m engine.bench`: the re-ranking benchmark (see `engine.bench.rerankers`)."""

from engine.bench.rerankers import main

if __name__ == "__main__":
    raise SystemExit(main())
