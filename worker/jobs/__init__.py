"""One module per job kind, each a `Compute` (worker.lifecycle) for its kind."""

from __future__ import annotations

from state.jobstore import JobKind
from worker.jobs.forget import compute_forget
from worker.jobs.label_studio import compute_label_studio_import, compute_label_studio_training
from worker.jobs.rank import compute_rank
from worker.jobs.self_influence import compute_self_influence
from worker.jobs.train import compute_training
from worker.lifecycle import Compute

COMPUTE: dict[JobKind, Compute] = {
    JobKind.TRAIN: compute_training,
    JobKind.FORGET: compute_forget,
    JobKind.SELF_INFLUENCE: compute_self_influence,
    JobKind.LABEL_STUDIO_TRAIN: compute_label_studio_training,
    JobKind.LABEL_STUDIO_IMPORT: compute_label_studio_import,
    JobKind.RANK: compute_rank,
}
