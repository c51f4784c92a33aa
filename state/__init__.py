"""Shared state of the service: what the api and the workers must agree on.

    settings.py   CommonSettings: Redis, the artifact store, leases (env vars LQF_*)
    ids.py        ids (`ds_…`, `mdl_…`, `job_…`) and timestamps
    logs.py       one JSON log line per record, for every process
    jobstore.py   job records, their status transitions and leases in Redis; JobKind
    queue.py      Celery task names per job kind, and enqueueing a job by name
    artifacts.py  the artifact store: datasets and models as files, atomic writes
    records.py    the typed records kept there: DatasetManifest, ModelRecord, ...
    registry.py   model names: numbered versions and aliases
    connections.py  Label Studio connections (secret URL, what /setup said)
    labelstudio.py  Label Studio's formats: labeling config, tasks, annotations

It imports neither `app` nor `worker` nor torch, so either side can use it alone.
"""
