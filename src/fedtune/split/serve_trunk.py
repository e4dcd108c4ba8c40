"""Run the trunk service as its own process: ``python -m fedtune.split.serve_trunk --help``.

Loads the base model and the LoRA adapter, cuts it, keeps only the trunk and serves it until
SIGTERM / SIGINT; then it stops taking sessions, lets running ones finish (``--grace``), and
writes the trained trunk adapter to ``--save-trunk``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.config import LoraConfig
from fedtune.models.adapters import attach_lora
from fedtune.models.load import resolve_model_path
from fedtune.split.partition_model import Trunk, cut_model
from fedtune.split.server import TrunkOptim, TrunkService, serve

log = logging.getLogger(__name__)


def load_trunk(model: str, adapter: str | None, n_head: int, n_tail: int, lora_r: int, seed: int) -> Trunk:
    """The trunk of ``model`` with ``adapter`` (a peft folder) or a fresh rank-``lora_r`` LoRA."""
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32)
    if adapter:
        peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    else:
        peft_model = attach_lora(base, LoraConfig(r=lora_r, alpha=2 * lora_r, dropout=0.0), seed=seed)
    return cut_model(peft_model, n_head, n_tail).trunk  # head and tail are dropped with the model


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtune.split.serve_trunk", description=__doc__)
    parser.add_argument("--model", required=True, help="model.name: built-in, hub id or local folder")
    parser.add_argument("--adapter", help="peft adapter folder to start from (default: a fresh LoRA)")
    parser.add_argument("--lora-r", type=int, default=8, help="rank of a fresh LoRA")
    parser.add_argument("--seed", type=int, default=0, help="seed of a fresh LoRA")
    parser.add_argument("--n-head", type=int, required=True, help="split.n_head")
    parser.add_argument("--n-tail", type=int, required=True, help="split.n_tail")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (see --ready-file)")
    parser.add_argument("--ready-file", type=Path, help="written with the bound port once serving")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--step-every", type=int, default=1, help="BACKWARDs per optimiser step")
    parser.add_argument("--max-message-mib", type=float, default=256.0)
    parser.add_argument("--save-trunk", type=Path, help="safetensors file for the trunk adapter at exit")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds running sessions get at exit")
    parser.add_argument("--threads", type=int, help="torch threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.threads:
        torch.set_num_threads(args.threads)

    trunk = load_trunk(args.model, args.adapter, args.n_head, args.n_tail, args.lora_r, args.seed)
    optim = TrunkOptim(lr=args.lr, weight_decay=args.weight_decay, step_every=args.step_every)
    service = TrunkService(trunk, optim, max_message_bytes=int(args.max_message_mib * 2**20))
    tls = (args.tls_cert.read_bytes(), args.tls_key.read_bytes()) if args.tls_cert else None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server, port = serve(service, args.host, args.port, tls)
    if args.ready_file:
        _write_atomically(args.ready_file, str(port))
    while not stop.wait(0.5):  # a timed wait lets the signal handler run promptly
        pass
    log.info("stopping the trunk service (grace %s s)", args.grace)
    server.stop(args.grace).wait()
    if args.save_trunk:
        log.info("trunk adapter after %d optimiser steps -> %s", service.steps_taken, args.save_trunk)
        service.save_adapter(args.save_trunk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
