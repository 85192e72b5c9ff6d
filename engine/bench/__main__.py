"""`python -m engine.bench`: the re-ranking benchmark (see `engine.bench.rerankers`)."""

from engine.bench.rerankers import main

raise SystemExit(main())
