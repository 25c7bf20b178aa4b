"""LoRA files from the Hugging Face hub: `user/repo` wherever a LoRA folder is taken (infer.py's
--checkpoint, the trainer's --init_lora). A local path that exists always wins."""

import os
import re
import sys

from wuerstchen_lora.models import LORA_WEIGHTS_NAME, TRAINING_INFO_NAME, UserError

_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


def looks_like_repo_id(spec):
    """`namespace/name` as the hub spells repo ids. A bare name or a `.safetensors` path is read as
    a local path: a mistyped folder then gets "no such file or folder", not a hub error."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if spec.count("/") != 1 or spec.endswith(".safetensors"):
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def local_lora_path(spec, flag="--checkpoint"):
    """A local LoRA file, or the folder (training output, checkpoint-N) that holds one."""
    if os.path.isdir(spec):
        path = os.path.join(spec, LORA_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise UserError(f"{flag} {spec}: no {LORA_WEIGHTS_NAME} in this folder; give a training output or checkpoint-N folder")
        return path
    if not os.path.isfile(spec):
        raise UserError(f"{flag} {spec}: no such file or folder")
    return spec


def resolve_lora_spec(spec, revision=None, flag="--checkpoint"):
    """The local path of the LoRA file that `spec` names: a file, a folder holding
    pytorch_lora_weights.safetensors, or a hub repo id (downloaded, or taken from the hub cache)."""
    spec = os.fspath(spec)
    if os.path.exists(spec) or not looks_like_repo_id(spec):
        if revision is not None:
            print(f"note: --revision {revision} applies to hub repos only; {flag} {spec} is read as a local path", file=sys.stderr)
        return local_lora_path(spec, flag)
    return fetch_lora(spec, revision, flag=flag)


def fetch_lora(spec, revision=None, flag="--checkpoint", with_info=True):
    """Download (or find in the local hub cache) the hub repo's LoRA file and, when the repo has one,
    its training_info.json beside it (infer.py reads the base model from it). Returns the LoRA path."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(spec, LORA_WEIGHTS_NAME, revision=revision)
    except _hub_errors() as e:
        raise hub_error(e, spec, revision, flag) from e
    if with_info:
        # The snapshot folder is named by its commit: take the info file from that same commit even
        # if the branch moved in between.
        try:
            hf_hub_download(spec, TRAINING_INFO_NAME, revision=commit_of(path) or revision)
        except _entry_not_found():
            pass  # optional: a LoRA from another tool has none
        except _hub_errors() as e:
            raise hub_error(e, spec, revision, flag) from e
    at = f"revision {revision}, " if revision else ""
    print(f"note: {flag} {spec}: the hub repo's {LORA_WEIGHTS_NAME} ({at}commit {(commit_of(path) or '?')[:12]})", file=sys.stderr)
    return path


def commit_of(path):
    """The commit a file in the hub cache came from (its snapshot folder's name), else None."""
    commit = os.path.basename(os.path.dirname(path))
    return commit if _COMMIT_HASH.match(commit) else None


def _entry_not_found():
    from huggingface_hub.utils import EntryNotFoundError

    return EntryNotFoundError


def _hub_errors():
    from huggingface_hub.utils import EntryNotFoundError, HFValidationError

    # HfHubHTTPError and the cache's errors are OSErrors; EntryNotFoundError is not on every release.
    return (OSError, EntryNotFoundError, HFValidationError)


def hub_error(e, repo, revision, flag):
    """One UserError line for a failed hub look-up: what went wrong and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{flag} {repo}" + (f" --revision {revision}" if revision else "")
    no_file = (f"{where}: the hub repo has no {LORA_WEIGHTS_NAME}; give a repo or folder that holds a LoRA "
               "trained by this tool (or the .safetensors file itself)")
    if isinstance(e, LocalEntryNotFoundError):  # the hub was not asked, or not reached
        if known_missing(repo, revision):
            return UserError(no_file)
        if constants.HF_HUB_OFFLINE:
            return UserError(f"{where}: no such local file or folder, and the hub repo is not in the local hub cache "
                             "while the hub is offline (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to download it, "
                             "or give an existing folder")
        return UserError(f"{where}: no such local file or folder, and the hub could not be reached nor is the repo "
                         "in the local hub cache; check the connection (and HF_ENDPOINT), or give an existing folder")
    if isinstance(e, GatedRepoError):
        return UserError(f"{where}: the hub repo is gated; accept its terms on https://huggingface.co/{repo} "
                         "and log in with `hf auth login`")
    if isinstance(e, RepositoryNotFoundError):
        return UserError(f"{where}: no such local file or folder, and no such hub repo (a private one needs "
                         "`hf auth login`); check the name")
    if isinstance(e, RevisionNotFoundError):
        return UserError(f"{where}: the hub repo has no branch, tag or commit {revision}; check --revision")
    if isinstance(e, EntryNotFoundError):
        return UserError(no_file)
    return UserError(f"{where}: the hub download failed ({first_line(e)}); try again, or give a local folder")


def known_missing(repo, revision):
    """Whether the hub cache remembers (from an earlier online look-up) that the repo lacks the file."""
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

    try:
        return try_to_load_from_cache(repo, LORA_WEIGHTS_NAME, revision=revision) is _CACHED_NO_EXIST
    except (OSError, ValueError):
        return False


def first_line(e):
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
