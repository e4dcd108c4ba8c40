"""Cut a Hugging Face decoder into head, trunk and tail for split learning.

The client keeps the :class:`Head` (embeddings + first ``n_head`` blocks) and the :class:`Tail`
(last ``n_tail`` blocks + final norm + lm_head); a server runs the :class:`Trunk`. Only two things
cross a cut: the hidden-state tensor and per-sample valid-token counts. Each part rebuilds its own
position ids, rotary embeddings and causal + padding mask from the counts (right padding: sample
``i`` has its first ``valid[i]`` tokens real), so token ids, labels and the mask never leave the
client.

Apply LoRA to the whole model first, then cut: the parts hold the same (LoRA-wrapped) block
modules as the model they were cut from and report adapter weights under peft's names, so the
union of the three adapter state dicts is ``get_peft_model_state_dict`` of the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from fedtune.errors import FedtuneError

LLAMA_FAMILY = frozenset({"llama", "qwen2"})  # embed_tokens / layers / norm / rotary_emb / lm_head
GPT2_FAMILY = frozenset({"gpt2"})  # wte / wpe / h / ln_f / lm_head
MAX_CUT_BLOCKS = 5

_MASK_BUILDERS: dict[str, Callable[..., Any]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


@dataclass
class PartCache:
    """One part's generation state: its KV cache and the prompt's padding layout.

    The cache keeps the model's global layer indices (``DynamicCache(config=...)`` has a slot for
    every layer, the other parts' slots stay empty), so the blocks need no renumbering and stay
    usable by the unsplit model they were cut from.
    """

    kv: DynamicCache
    prompt_valid: Tensor | None = None
    prompt_len: int = 0
    seen: int = 0  # cache columns filled so far (prompt incl. padding + generated)


class _Part(nn.Module):
    """Blocks ``first_layer .. first_layer + len(blocks) - 1`` of a decoder and their attention set-up."""

    def __init__(
        self, config: PretrainedConfig, blocks: list[nn.Module], first_layer: int, rotary: nn.Module | None
    ) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(blocks)
        self.first_layer = first_layer
        self.rotary = rotary  # None for GPT-2, whose positions enter once, in the head (wpe)
        n_layers = config.num_hidden_layers
        all_types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
        self.layer_types: list[str] = list(all_types[first_layer : first_layer + len(blocks)])
        unknown = sorted(set(self.layer_types) - set(_MASK_BUILDERS))
        if unknown:
            raise FedtuneError(f"model.name: split learning does not support {unknown} layers")
        self._adapter_keys: dict[str, str] = {}  # local parameter name -> peft state-dict key

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def layer_range(self) -> range:
        """Global indices of this part's blocks in the uncut model."""
        return range(self.first_layer, self.first_layer + len(self.blocks))

    def new_cache(self) -> PartCache:
        """An empty KV cache for generating with this part."""
        return PartCache(kv=DynamicCache(config=self.config))

    # -- adapters -------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The part's LoRA weights under peft's state-dict names, as detached fp32 copies."""
        params = dict(self.named_parameters())
        return {
            key: params[local].detach().to(torch.float32).clone() for local, key in self._adapter_keys.items()
        }

    def load_adapter_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy LoRA weights in; ``state`` may hold other parts' keys too, but must hold all of ours."""
        missing = sorted(set(self._adapter_keys.values()) - set(state))
        if missing:
            raise FedtuneError(
                f"adapter state lacks {len(missing)} keys of the {type(self).__name__}: {missing[:3]}"
            )
        params = dict(self.named_parameters())
        with torch.no_grad():
            for local, key in self._adapter_keys.items():
                params[local].copy_(state[key])

    def _bind_adapter_keys(self, root: nn.Module, adapter_name: str | None) -> None:
        local_by_id = {id(p): name for name, p in self.named_parameters()}
        for name, param in root.named_parameters():
            if "lora_" in name and id(param) in local_by_id:
                # peft's own naming: the adapter name is dropped from the key
                key = name.replace(f".{adapter_name}", "") if adapter_name else name
                self._adapter_keys[local_by_id[id(param)]] = key

    # -- attention set-up rebuilt from counts ---------------------------------------------------

    def _positions_and_mask(
        self, valid: Tensor, q_len: int, cache: PartCache | None
    ) -> tuple[Tensor, Tensor]:
        """Position ids (B, q) and the 2-D padding mask (B, kv) for ``q_len`` new columns."""
        device = valid.device
        cols = torch.arange(q_len, device=device)
        if cache is None or cache.prompt_valid is None:
            mask = cols.unsqueeze(0) < valid.unsqueeze(1)
            positions = cols.unsqueeze(0).expand(valid.shape[0], -1)
            if cache is not None:
                cache.prompt_valid, cache.prompt_len = valid.clone(), q_len
            return positions, mask
        generated = cache.seen - cache.prompt_len
        expected = cache.prompt_valid + generated + q_len
        if not torch.equal(valid, expected):
            raise ValueError(
                f"valid counts {valid.tolist()} do not continue the cached prompt "
                f"(expected {expected.tolist()})"
            )
        # Generated tokens sit after the prompt's padding; keys are masked there, positions run on.
        prompt_mask = torch.arange(cache.prompt_len, device=device).unsqueeze(
            0
        ) < cache.prompt_valid.unsqueeze(1)
        new_mask = torch.ones(valid.shape[0], generated + q_len, dtype=torch.bool, device=device)
        positions = (valid - q_len).unsqueeze(1) + cols.unsqueeze(0)
        return positions, torch.cat([prompt_mask, new_mask], dim=1)

    def _run_blocks(self, hidden: Tensor, positions: Tensor, mask: Tensor, cache: PartCache | None) -> Tensor:
        kv = cache.kv if cache is not None else None
        masks = {}
        for kind in set(self.layer_types):
            # size the mask on one of our own layers: the other parts' cache slots stay empty
            layer_idx = self.first_layer + self.layer_types.index(kind)
            masks[kind] = _MASK_BUILDERS[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=mask,
                past_key_values=kv,
                position_ids=positions,
                layer_idx=layer_idx,
            )
        extra = {"position_embeddings": self.rotary(hidden, positions)} if self.rotary is not None else {}
        for block, kind in zip(self.blocks, self.layer_types, strict=True):
            out = block(
                hidden,
                attention_mask=masks[kind],
                position_ids=positions,
                past_key_values=kv,
                use_cache=kv is not None,
                **extra,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        if cache is not None:
            cache.seen += hidden.shape[1]
        return hidden

    def _check_activations(self, hidden: Tensor, valid: Tensor, cache: PartCache | None) -> None:
        """Reject a malformed incoming activation before it reaches a block."""
        if not (isinstance(hidden, Tensor) and hidden.is_floating_point() and hidden.ndim == 3):
            raise ValueError(
                f"{type(self).__name__}: hidden states must be a float (batch, seq, hidden) tensor"
            )
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"{type(self).__name__}: hidden size {hidden.shape[-1]} != model's {self.hidden_size}"
            )
        _check_valid(valid, hidden.shape[0], hidden.shape[1], cache, type(self).__name__)


def _check_valid(valid: Tensor, batch: int, q_len: int, cache: PartCache | None, who: str) -> None:
    if (
        not isinstance(valid, Tensor)
        or valid.dtype not in (torch.int32, torch.int64)
        or valid.shape != (batch,)
    ):
        raise ValueError(f"{who}: valid counts must be an int32/int64 tensor of shape ({batch},)")
    prefill = cache is None or cache.prompt_valid is None  # decode steps are checked against the cache
    if prefill and (bool((valid < 1).any()) or bool((valid > q_len).any())):
        raise ValueError(f"{who}: valid counts must lie in 1..{q_len}, got {valid.tolist()}")


class Head(_Part):
    """Client side, first part: token embeddings (+ learned positions for GPT-2) and the first blocks."""

    def __init__(
        self,
        config: PretrainedConfig,
        embed: nn.Module,
        blocks: list[nn.Module],
        rotary: nn.Module | None,
        positions: nn.Module | None = None,
        dropout: nn.Module | None = None,
    ) -> None:
        super().__init__(config, blocks, 0, rotary)
        self.embed = embed
        self.wpe = positions
        self.drop = dropout

    def forward(self, input_ids: Tensor, valid: Tensor, cache: PartCache | None = None) -> Tensor:
        """Embed ``input_ids`` (B, T) and run the head blocks: returns h1 (B, T, hidden)."""
        if input_ids.ndim != 2 or input_ids.is_floating_point():
            raise ValueError("Head: input_ids must be an integer (batch, seq) tensor")
        _check_valid(valid, input_ids.shape[0], input_ids.shape[1], cache, "Head")
        valid = valid.to(input_ids.device)
        positions, mask = self._positions_and_mask(valid, input_ids.shape[1], cache)
        hidden = self.embed(input_ids)
        if self.wpe is not None:
            hidden = hidden + self.wpe(positions)
        if self.drop is not None:
            hidden = self.drop(hidden)
        return self._run_blocks(hidden, positions, mask, cache)


class Trunk(_Part):
    """Server side: the middle blocks."""

    def forward(self, hidden: Tensor, valid: Tensor, cache: PartCache | None = None) -> Tensor:
        """Run the trunk blocks on h1 (B, T, hidden): returns h2 of the same shape."""
        self._check_activations(hidden, valid, cache)
        valid = valid.to(hidden.device)  # counts may arrive on the CPU from the transport
        positions, mask = self._positions_and_mask(valid, hidden.shape[1], cache)
        return self._run_blocks(hidden, positions, mask, cache)


class Tail(_Part):
    """Client side, last part: the last blocks, the final norm, lm_head and the loss."""

    def __init__(
        self,
        config: PretrainedConfig,
        blocks: list[nn.Module],
        first_layer: int,
        rotary: nn.Module | None,
        norm: nn.Module,
        lm_head: nn.Module,
        loss_function: Callable[..., Tensor],
    ) -> None:
        super().__init__(config, blocks, first_layer, rotary)
        self.norm = norm
        self.lm_head = lm_head
        self.loss_function = loss_function

    def forward(
        self, hidden: Tensor, valid: Tensor, labels: Tensor | None = None, cache: PartCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Run the tail on h2: returns (logits (B, T, vocab), loss or None).

        The loss is the model's own (HF causal-LM: labels shifted inside, -100 ignored), so it
        equals the unsplit model's ``loss`` for the same labels.
        """
        self._check_activations(hidden, valid, cache)
        valid = valid.to(hidden.device)  # counts may arrive on the CPU from the transport
        positions, mask = self._positions_and_mask(valid, hidden.shape[1], cache)
        hidden = self.norm(self._run_blocks(hidden, positions, mask, cache))
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return logits, loss


class SplitParts(NamedTuple):
    """A model cut in three: the client's head and tail, the server's trunk."""

    head: Head
    trunk: Trunk
    tail: Tail


def cut_model(model: PreTrainedModel | PeftModel, n_head: int, n_tail: int) -> SplitParts:
    """Cut a causal LM (optionally peft-wrapped) into head, trunk and tail.

    Parameters
    ----------
    model
        A Llama-family (Llama, SmolLM2, Qwen2) or GPT-2 causal LM; wrap it with LoRA *before*
        cutting so that every part holds its blocks' adapters.
    n_head, n_tail
        Blocks kept by the client before and after the trunk, each 1..5; the trunk keeps at least one.

    Returns
    -------
    SplitParts
        ``(head, trunk, tail)``. They share modules with ``model`` (no copy): a process drops the
        parts it does not run.
    """
    root: nn.Module = model
    adapter_name: str | None = None
    if isinstance(model, PeftModel):
        adapter_name = model.active_adapter
        base: Any = model.get_base_model()
    else:
        base = model
    config = base.config
    n_layers = int(config.num_hidden_layers)
    for key, n in (("split.n_head", n_head), ("split.n_tail", n_tail)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CUT_BLOCKS:
            raise FedtuneError(f"{key}: must be an integer from 1 to {MAX_CUT_BLOCKS}, got {n!r}")
    if n_head + n_tail >= n_layers:
        raise FedtuneError(
            f"split.n_head + split.n_tail: {n_head} + {n_tail} leaves no block for the trunk "
            f"of a {n_layers}-layer model (must be below {n_layers})"
        )
    tail_start = n_layers - n_tail
    if config.model_type in LLAMA_FAMILY:
        inner = base.model
        blocks, rotary = list(inner.layers), inner.rotary_emb
        head = Head(config, inner.embed_tokens, blocks[:n_head], rotary)
        norm = inner.norm
    elif config.model_type in GPT2_FAMILY:
        inner = base.transformer
        blocks, rotary = list(inner.h), None
        head = Head(config, inner.wte, blocks[:n_head], None, positions=inner.wpe, dropout=inner.drop)
        norm = inner.ln_f
    else:
        supported = ", ".join(sorted(LLAMA_FAMILY | GPT2_FAMILY))
        raise FedtuneError(
            f"model.name: split learning supports model types {supported}, not {config.model_type!r}"
        )
    trunk = Trunk(config, blocks[n_head:tail_start], n_head, rotary)
    tail = Tail(config, blocks[tail_start:], tail_start, rotary, norm, base.lm_head, base.loss_function)
    for part in (head, trunk, tail):
        part._bind_adapter_keys(root, adapter_name)
    return SplitParts(head, trunk, tail)


def client_adapter_state_dict(head: Head, tail: Tail) -> dict[str, Tensor]:
    """The client-side adapter (head + tail), the part aggregated across clients each round."""
    return {**head.adapter_state_dict(), **tail.adapter_state_dict()}


def valid_counts(attention_mask: Tensor) -> Tensor:
    """Per-sample valid-token counts of a right-padded 0/1 attention mask (B, T) -> int64 (B,)."""
    mask = attention_mask.to(torch.bool)
    valid = mask.sum(dim=1)
    right_padded = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < valid.unsqueeze(1)
    if not torch.equal(mask, right_padded):
        raise ValueError("attention_mask must be right-padded (ones then zeros) for split learning")
    return valid.to(torch.int64)
