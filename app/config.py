"""The api's settings (env vars LQF_*), cached so tests and the launcher can override them."""

from __future__ import annotations

from functools import lru_cache

from state.settings import CommonSettings


class Settings(CommonSettings):
    """The api's settings: the shared ones (state.settings) and its own."""

    # "tenant:key,tenant2:key2". Empty: every request is refused (the launcher fills it).
    api_keys: str = ""
    host: str = "127.0.0.1"
    port: int = 8000

    # Upload limits: checked before anything is written.
    max_upload_bytes: int = 512 * 1024 * 1024
    max_archive_files: int = 20_000
    max_uncompressed_bytes: int = 2 * 1024 * 1024 * 1024
    # A request body must keep arriving (no gap longer than idle) and be complete within
    # total: a client that stalls gets a 408 instead of holding the request open.
    body_idle_timeout_s: float = 60.0
    body_timeout_s: float = 900.0
    # Checking and storing an archive's images, once received: past it a 503 and nothing
    # is stored.
    upload_process_timeout_s: float = 600.0

    # Prediction
    max_predict_images: int = 64
    predict_max_batch: int = 32
    predict_max_wait_ms: float = 5.0
    # Forward passes run in inference processes (app/predict/inference.py), one batch in
    # flight per process. False: in a thread of the API process, where they compete with
    # request handling for the GIL (debugging only).
    predict_process: bool = True
    # How many inference processes; 0 = automatic: one per CPU core (at most 4) when
    # predicting on the CPU, one on a GPU. Several single-threaded processes beat one
    # process with as many threads: torch's intra-op threads scale poorly on these small
    # batches (docs/benchmarks.md, serving).
    predict_processes: int = 0
    # Intra-op threads of each inference process; 0 = the cores shared out among them.
    predict_torch_threads: int = 0
    model_cache_size: int = 4
    predict_device: str = "auto"
    # A /predict batch answers within this or the client gets a 504 (the closed-form part
    # of a query has LQF_QUERY_TIMEOUT_S).
    predict_timeout_s: float = 30.0

    # Label Studio ML backend (/label-studio/{model_id}): task images given as URLs are
    # fetched only from this Label Studio, with this API key ("Token" auth).
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    label_studio_max_tasks: int = 1000  # tasks per /predict call
    label_studio_max_image_bytes: int = 32 * 1024 * 1024

    # Closed-form queries of lqf models (influence, self-influence, uncertainty)
    # CG solves when N*C <= this, else K-FAC. 0: on real backbones the CG solves do not
    # converge in 500 iterations even at N*C = 1,500 (README, exactness policy).
    exact_query_limit: int = 0
    posterior_cache_size: int = 2
    query_threads: int = 1
    # Every closed-form query answers within this or gets a 503, and its computation is
    # stopped.
    query_timeout_s: float = 30.0
    # A posterior's build (prefix pass, quadratic, K-FAC factors) outlives the request that
    # started it, up to this; requests meanwhile get a 503 with Retry-After.
    posterior_build_timeout_s: float = 900.0

    # Per tenant (app/limits.py); 0 turns a limit off. The request rate is counted by each
    # API process; the burst defaults to twice the rate.
    tenant_requests_per_s: float = 0.0
    tenant_request_burst: float = 0.0
    tenant_max_unfinished_jobs: int = 32
    tenant_max_stored_bytes: int = 100 * 1024**3

    def tenant_keys(self) -> dict[str, str]:
        """key -> tenant, from LQF_API_KEYS."""
        out: dict[str, str] = {}
        for pair in self.api_keys.split(","):
            pair = pair.strip()
            if not pair:
                continue
            tenant, sep, key = pair.partition(":")
            if not sep or not tenant.strip() or not key.strip():
                raise ValueError(f"LQF_API_KEYS entry {pair!r} is not 'tenant:key'")
            out[key.strip()] = tenant.strip()
        return out


@lru_cache
def get_settings() -> Settings:
    return Settings()
