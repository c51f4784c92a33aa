"""The Celery worker: thin tasks around lqf_core.

    celery_app.py  the Celery app, heartbeat and sweeper, shutdown signal
    tasks.py       one task per job kind (names in state.queue)
    lifecycle.py   a job's life: claim, lease, stop, progress, final record
    jobs/          one module per job kind: what it computes and stores
    config.py      WorkerSettings

Job state and artifacts live in `state`, shared with the api.
"""
