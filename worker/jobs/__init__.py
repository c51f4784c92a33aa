"""One module per job kind, each a `Compute` (worker.lifecycle) for its kind."""

from __future__ import annotations

from state.jobstore import JobKind
from worker.jobs.forget import compute_forget
from worker.jobs.self_influence import compute_self_influence
from worker.jobs.train import compute_training
from worker.lifecycle import Compute

COMPUTE: dict[JobKind, Compute] = {
    JobKind.TRAIN: compute_training,
    JobKind.FORGET: compute_forget,
    JobKind.SELF_INFLUENCE: compute_self_influence,
}
