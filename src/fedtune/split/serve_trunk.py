"""A trunk service as a process of its own: what ``fedtune serve-trunk`` runs.

It reads the same config as a run: ``model`` (base model, dtype, RoPE scaling and, without
an adapter folder, the fresh LoRA seeded with ``seed``), ``split.n_head`` / ``split.n_tail``
(the cut), ``split.host`` / ``split.port`` / ``split.tls_*`` / ``split.max_message_mib`` (the
endpoint), ``split.trunk_lr`` (else ``train.lr``), ``train.weight_decay`` and
``train.grad_accum`` (BACKWARDs per optimiser step) for the trunk's optimiser, and
``train.num_threads``. One process serves one trunk, its sessions in turn (the ServerApp's
``split.mode`` and ``split.groups`` are not read here: start one process per replica).

It serves until SIGTERM / SIGINT; then it stops taking sessions, lets running ones finish
(``grace`` seconds), and writes the trained trunk adapter (``save_trunk``).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.io import atomic_file, write_text_atomic
from fedtune.models.adapters import attach_lora, load_adapter_folder
from fedtune.models.load import load_model
from fedtune.split.partition_model import Trunk, cut_model
from fedtune.split.server import TrunkOptim, TrunkService, serve

log = logging.getLogger(__name__)


def load_trunk(cfg: Config, adapter: str | Path | None = None) -> Trunk:
    """The trunk of ``cfg.model`` cut at ``cfg.split``, with a trainable LoRA adapter.

    The adapter is ``adapter`` (a peft folder) or a fresh ``cfg.model.lora`` drawn from ``cfg.seed``.
    """
    base = load_model(cfg.model)
    if adapter is not None:
        peft_model = load_adapter_folder(base, adapter, trainable=True)
    else:
        peft_model = attach_lora(base, cfg.model.lora, seed=cfg.seed)
    return cut_model(peft_model, cfg.split.n_head, cfg.split.n_tail).trunk  # head and tail go with the model


def serve_trunk(
    cfg: Config,
    *,
    adapter: str | Path | None = None,
    ready_file: str | Path | None = None,
    save_trunk: str | Path | None = None,
    grace: float = 5.0,
) -> TrunkService:
    """Serve the trunk until SIGTERM / SIGINT; returns the stopped service.

    Parameters
    ----------
    adapter
        Peft adapter folder to start from (e.g. ``RUN_DIR/final``); default a fresh LoRA.
    ready_file
        Written (atomically) with the bound port once serving: ``split.port = 0`` binds any free one.
    save_trunk
        Safetensors file for the trunk adapter at exit.
    grace
        Seconds running sessions get to finish at exit.
    """
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    split = cfg.split
    tls = None
    if split.tls_cert and split.tls_key:  # read before the model loads, so a wrong path fails at once
        cert, key = Path(split.tls_cert), Path(split.tls_key)
        for name, path in (("split.tls_cert", cert), ("split.tls_key", key)):
            if not path.is_file():
                raise FedtuneError(f"{name}: {path} is not a file")
        tls = (cert.read_bytes(), key.read_bytes())
    trunk = load_trunk(cfg, adapter)
    optim = TrunkOptim(
        lr=split.trunk_lr or cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        step_every=cfg.train.grad_accum,
    )
    service = TrunkService(trunk, optim, max_message_bytes=int(split.max_message_mib * 2**20))
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server, port = serve(service, split.host, split.port, tls)
        if ready_file is not None:
            write_text_atomic(ready_file, str(port))
        while not stop.wait(0.5):  # a timed wait lets the signal handler run promptly
            pass
        log.info("stopping the trunk service (grace %s s)", grace)
        server.stop(grace).wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if save_trunk is not None:
        log.info("trunk adapter after %d optimiser steps -> %s", service.steps_taken, save_trunk)
        with atomic_file(save_trunk) as tmp:
            service.save_adapter(tmp)
    return service


__all__ = ["load_trunk", "serve_trunk"]
