"""A vLLM worker extension: swaps a running engine's weights for a checkpoint folder's, or for those the
trainer broadcasts over a process group of its own (``shared.weight_broadcast``).

vLLM mixes ``WeightReloadExtension`` into its worker class when the engine is built with
``worker_extension_cls="rollout_server.vllm_worker.WeightReloadExtension"``; ``AsyncLLM.collective_rpc``
then calls its methods on every worker (every tensor-parallel rank).

The swap is vLLM's own ``reload_weights`` (layerwise reload: each layer's weights are loaded, then
re-processed by the layer's quantisation / kernel method, then copied into the tensors the compiled
graph already holds). Two things it leaves undone are done here:

- Tied embeddings on the CPU backend. There the output head packs its weight into a oneDNN/sgl GEMM
  once, at load time. With ``tie_word_embeddings`` the checkpoint has no ``lm_head.weight``, so the
  reload never re-processes the head, and logits keep coming from the old packed copy. Re-running the
  embedding method's ``process_weights_after_loading`` re-packs it (a no-op on GPUs, which use the
  shared tensor directly).
- A reload that fails half-way leaves layers on the meta device with half their new weights
  buffered, and the next reload would replay that buffer. ``_abandon_layerwise_reload`` puts every
  such layer's serving tensors back, so that reloading the previous checkpoint can succeed.

This module imports vLLM: only the worker processes of the vLLM virtualenv import it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from vllm.config import set_current_vllm_config

from shared.weight_broadcast import BroadcastError, Invitation, Member

logger = logging.getLogger(__name__)

_MEMBER = Member()
"""This worker's end of the trainer's broadcasts (one worker per process: tensor parallelism is refused)."""


class WeightReloadExtension:
    """Methods added to vLLM's worker, whose attributes ``self`` has.

    vLLM refuses an extension that defines any name its worker has, so the worker's own members
    are only annotated here.
    """

    model_runner: Any
    vllm_config: Any
    reload_weights: Callable[..., None]

    def cppo_reload_weights(self, weights_path: str) -> None:
        """Replace the model's weights with those of the safetensors checkpoint in ``weights_path``."""
        self._cppo_reload(weights_path=weights_path)

    def cppo_receive_broadcast(self, invitation: dict[str, Any]) -> str | None:
        """Join the trainer's process group (``shared.weight_broadcast``), receive the weights it broadcasts,
        then load them as ``cppo_reload_weights`` loads a checkpoint's.

        A failed transfer is returned as its message rather than raised, so that the backend can tell it
        (the serving weights untouched: every tensor is received before any is loaded) from a failed load."""
        try:
            tensors, _ = _MEMBER.receive(Invitation.from_dict(invitation))
        except BroadcastError as error:
            return str(error)
        self._cppo_reload(weights_iterator=iter(tensors.items()))
        return None

    def _cppo_reload(self, **source: Any) -> None:
        model = self.model_runner.get_model()
        try:
            self.reload_weights(is_checkpoint_format=True, **source)
        except BaseException:
            _abandon_layerwise_reload(model)
            raise
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            _reprocess_embedding_methods(model)


def _reprocess_embedding_methods(model: torch.nn.Module) -> None:
    """Re-run the unquantised embedding method's post-load processing on every embedding and head."""
    try:
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    except ImportError as error:
        # Only the CPU backend packs embeddings; elsewhere there is nothing to redo.
        logger.warning("cannot re-process embeddings after a weight reload on this vLLM: %s", error)
        return
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod):
            method.process_weights_after_loading(module)


def _abandon_layerwise_reload(model: torch.nn.Module) -> None:
    """Undo an interrupted layerwise reload: every layer still waiting for weights gets its serving
    tensors (and plain weight loaders) back. Layers already swapped keep the new weights; the caller
    reloads a whole checkpoint next. Uses vLLM internals, so it is best effort: on another vLLM
    layout it logs and leaves the model as it is."""
    try:
        _put_serving_tensors_back(model)
    except Exception as error:  # never mask the reload's own error with the clean-up's
        logger.warning("cannot clean up an interrupted weight reload on this vLLM: %r", error)


def _put_serving_tensors_back(model: torch.nn.Module) -> None:
    from vllm.model_executor.model_loader.reload import layerwise
    from vllm.model_executor.model_loader.reload.utils import get_layer_tensors

    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    restored = 0
    for layer in model.modules():
        info = layerwise.LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load():
            continue
        if info.kernel_tensors is not None:
            layerwise._place_kernel_tensors(layer, info)
            restored += 1
        for tensor in get_layer_tensors(layer).values():
            if hasattr(tensor, "weight_loader"):
                tensor.weight_loader = layerwise._get_original_loader(tensor)
        info.reset()
    layerwise.LOADING_LAYERS.clear()
    logger.warning("interrupted weight reload: put the serving tensors of %d layers back", restored)
