"""Host-device synchronisations of a call, as torch's sync debug mode sees them:
the check the GPU tests put around every patched call."""

from __future__ import annotations

import contextlib
import warnings

import torch

import attnpatch


@contextlib.contextmanager
def sync_debug_mode(mode):
    """torch's sync debug mode set to ``mode`` while the block runs."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def host_syncs(call):
    """``call()`` and the host-device synchronisations it made, as counted by
    torch's sync debug mode ("warn": one warning per synchronising operation)."""
    with sync_debug_mode("warn"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, sum("synchronizing" in str(w.message) for w in caught)


def run_adding_no_sync(unpatched, patched):
    """``patched()``, checked to synchronise with the host no more than
    ``unpatched()`` (the same call without attnpatch) does. Where torch makes no
    sync in the call, ``patched()`` runs under ``set_sync_debug_mode("error")``,
    so a sync raises where it happens; where torch itself syncs (some of its mask
    checks read values), the two are counted."""
    _, torch_syncs = host_syncs(unpatched)
    if torch_syncs == 0:
        with sync_debug_mode("error"):
            return patched()
    result, syncs = host_syncs(patched)
    assert syncs <= torch_syncs, f"attnpatch added {syncs - torch_syncs} host syncs to the {torch_syncs} of torch"
    return result


def under_attnpatch(call, targets=None):
    """``call`` inside ``attnpatch.patched(targets)``."""

    def call_patched():
        with attnpatch.patched(targets):
            return call()

    return call_patched
