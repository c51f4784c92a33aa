"""The HTTP service (FastAPI): HTTP only, over lqf_core's serving interface and `state`.

    main.py, config.py, deps.py, errors.py   the app, its settings, auth, error shapes
    datasets/ jobs/ models/ names/ predict/ queries/ labelstudio/ ops/
                                             one folder per domain: router, schemas, service
    bodies.py      the one parser of image bodies (multipart or JSON)
    cache.py       the one async LRU (loaded predictors, posteriors)
    pagination.py  Page[T], every list response
    launcher.py    Redis + workers + API on one machine (make serve, tests, benchmarks)
    embedded.py    `make serve`

It imports nothing from `worker`: jobs are queued by name (state.queue).
"""
