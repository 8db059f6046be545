"""Upload a checkpoint folder to the Hub as one commit whose README.md is our card.

We do not call `model.push_to_hub`: transformers' push rewrites README.md with its own auto-generated card.
`push_checkpoint` uploads the folder in a single `create_commit` that mirrors it: files from an earlier push that
the folder no longer has are deleted, so a revision never mixes two checkpoints' shards.

No request waits forever: huggingface_hub's shared HTTP client has no timeout of its own, so a server that accepts
a connection and never answers would hang the push; `push_checkpoint(timeout=...)` bounds each request and turns a
silent or unreachable Hub into a `TimeoutError` / `ConnectionError` naming the endpoint.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard

from .custom_code import custom_code_for_checkpoint
from .folder import checkpoint_files, weight_files
from .model_card import model_card_for_checkpoint
from .weights import merge_adapter_checkpoint, reshard_weights

DEFAULT_COMMIT_MESSAGE = "Upload checkpoint with modeling-multimodal"
DEFAULT_PUSH_TIMEOUT_S = 60.0  # per request: connecting, each write and waiting for each answer


@contextmanager
def hub_request_timeout(seconds: float | None, endpoint: str | None = None):
    """Within the block, every huggingface_hub request waits at most `seconds` to connect, write or get an answer.

    Installs a client factory that sets the timeout on huggingface_hub's shared client (also on the fresh client
    it builds after a connection error), and restores the previous factory on exit. A request that times out or
    cannot connect raises `TimeoutError` / `ConnectionError` naming the endpoint and the request.
    """
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http

    if seconds is None:
        yield
        return
    if not seconds > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {seconds!r}")
    # huggingface_hub has no public getter for the installed factory (a user's own, maybe): read its private global
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def client_with_timeout():
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        return client

    where = endpoint or constants.ENDPOINT
    set_client_factory(client_with_timeout)
    try:
        yield
    except httpx2.TimeoutException as err:
        raise TimeoutError(
            f"the Hub at {where} did not answer within {seconds:g} s ({err.request.method} {err.request.url}); "
            "check the endpoint or raise the timeout"
        ) from err
    except httpx2.TransportError as err:
        raise ConnectionError(f"cannot reach the Hub at {where}: {err}") from err
    finally:
        set_client_factory(previous)


def push_checkpoint(
    checkpoint_dir: str | Path,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    *,
    card: ModelCard | str | None = None,
    merge_adapter: bool = False,
    base_model: str | None = None,
    max_shard_size: int | str | None = None,
    endpoint: str | None = None,
    timeout: float | None = DEFAULT_PUSH_TIMEOUT_S,
) -> CommitInfo:
    """Push a saved checkpoint (model, processor, or LoRA adapter) to `repo_id` as one commit, with our model card.

    Creates the repo (and the `revision` branch, from `main`) if needed. The revision then holds exactly the
    folder's files (stale ones from earlier pushes are deleted) and README.md is `card`, or the card rendered
    from the folder (see `model_card_for_checkpoint`). A folder with a MultimodalConfig model or a
    MultimodalProcessor also gets their flattened code and `auto_map` (`custom_code_for_checkpoint`), so the repo
    loads with `trust_remote_code=True` where modeling-multimodal is not installed. With `merge_adapter=True` an
    adapter checkpoint is folded into `base_model` (default: the adapter's own base) and the full weights are
    pushed instead. With `max_shard_size` (`"2GB"`, `"200MB"` or bytes) the model weights are pushed as shards of
    at most that size plus `model.safetensors.index.json` (the folder is not changed); without it they are pushed
    as saved. Each request waits at most `timeout` seconds (`None`: forever; see `hub_request_timeout`); symlinks
    to files outside the folder are refused. Returns the `CommitInfo`; its `oid` is the new revision's commit sha.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ValueError(f"Checkpoint folder {checkpoint_dir} does not exist")
    files = checkpoint_files(checkpoint_dir)  # checks the folder (symlinks, pickles) before anything is read
    if merge_adapter:
        with tempfile.TemporaryDirectory(prefix="merged-") as merged_dir:
            with hub_request_timeout(timeout, endpoint):  # the base model may come from the Hub
                merge_adapter_checkpoint(checkpoint_dir, merged_dir, base_model=base_model, token=token)
            return push_checkpoint(
                merged_dir, repo_id, revision, private, token, commit_message, card=card,
                max_shard_size=max_shard_size, endpoint=endpoint, timeout=timeout,
            )  # fmt: skip

    if card is None:
        card = model_card_for_checkpoint(checkpoint_dir, repo_id)
    readme = str(card) if isinstance(card, ModelCard) else card
    with hub_request_timeout(timeout, endpoint):
        api = HfApi(endpoint=endpoint, token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        branch = revision or "main"
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        generated = {"README.md": readme.encode("utf-8")}
        # code and auto_map travel with the weights and the processor
        generated |= {name: text.encode("utf-8") for name, text in custom_code_for_checkpoint(checkpoint_dir).items()}
        sources = {path: checkpoint_dir / path for path in files if path not in generated}
        with tempfile.TemporaryDirectory(prefix="shards-") as shard_dir:
            if max_shard_size is not None and weight_files(checkpoint_dir):
                for path in weight_files(checkpoint_dir):
                    sources.pop(path, None)
                resharded = reshard_weights(checkpoint_dir, shard_dir, max_shard_size)
                sources |= {path: Path(shard_dir) / path for path in resharded}
            keep = {*sources, *generated, ".gitattributes"}
            stale = [path for path in api.list_repo_files(repo_id, revision=branch) if path not in keep]
            operations = [CommitOperationDelete(path) for path in stale]
            operations += [CommitOperationAdd(path, str(source)) for path, source in sources.items()]
            operations += [CommitOperationAdd(path, content) for path, content in generated.items()]
            return api.create_commit(repo_id, operations, commit_message=commit_message, revision=branch)
