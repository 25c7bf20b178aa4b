"""Count the aten operations the forward of one LoRA training step of the prior dispatches, under
CUDA's autocast policy, without a GPU.

The prior is built from fake tensors on a fake CUDA device (torch's FakeTensorMode: shapes and
dtypes, no memory, no arithmetic), so the real 994 M-parameter configuration costs nothing. CUDA
autocast is switched on by hand (torch.autocast refuses to without a GPU); the dispatcher then
applies CUDA's casting policy exactly as on a GPU. Each counted op is one kernel launch or more on
the GPU, so the counts say where the launches and the dtype copies (`aten._to_copy`) come from.
The backward is not run: autograd's engine wants a real CUDA context. Its dtype copies mirror the
forward's (each cast has a cast back in the backward). Used by the benchmark and by a test.
"""

import collections
import contextlib
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.copy_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if not name.startswith("prim."):
            self.ops[name] += 1
            if name == "aten._to_copy.default" and isinstance(out, torch.Tensor):
                self.copy_bytes += out.numel() * out.element_size()
        return out


@contextlib.contextmanager
def _cuda_autocast(dtype):
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_enabled("cuda", True)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.set_autocast_enabled("cuda", False)
        torch.clear_autocast_cache()


def lora_step_ops(config, optimized=True, batch=2, grid=4, rank=8, dtype=torch.bfloat16, with_copy_bytes=False):
    """Ops of one training forward (and the loss) of the prior `config` with attention LoRA, bf16 weights and
    fp32 LoRA weights, as the trainer runs it (`optimized`) or without the trainer's dtype fixes
    (peft casting activations to fp32, autocast's fp32 norms)."""
    from peft import LoraConfig
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wuerstchen_lora import recipe as trainer
    from wuerstchen_lora.models import WuerstchenPrior, use_sdpa_attention

    previous = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        torch.set_default_dtype(dtype)  # built in place: moving fake modules with .to() fails
        try:
            prior = WuerstchenPrior(**{k: v for k, v in config.items() if not k.startswith("_")})
            prior.requires_grad_(False)
            use_sdpa_attention(prior)
            # peft moves each new adapter to its base layer's device with Module.to(), which cannot
            # swap fake parameters; here they are created on that device and in that dtype already.
            with mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
                prior.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        finally:
            torch.set_default_dtype(previous)
        for p in prior.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if optimized:
            for module in prior.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
            trainer.norms_in_activation_dtype(prior, dtype)
        prior.train()
        c_in, c_cond = prior.config.c_in, prior.config.c_cond
        x = torch.randn(batch, c_in, grid, grid, dtype=torch.float32)
        noise = torch.randn_like(x)
        t = torch.rand(batch, dtype=torch.float32)
        text = torch.randn(batch, 77, c_cond, dtype=dtype)
        counter = _Counter()

        def fused_attention(q, k, v, *args, **kwargs):
            # Without a GPU, fake tensors take SDPA's math fallback (an explicit fp32 softmax);
            # on the GPU this is one flash/efficient-attention kernel in bf16: count it as that.
            counter.ops["aten._scaled_dot_product_flash_attention"] += 1
            return torch.empty(q.shape[:-1] + v.shape[-1:], dtype=dtype)

        with counter, mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", fused_attention):
            with _cuda_autocast(dtype):
                pred = prior(x, t, text)
            torch.nn.functional.mse_loss(pred.float(), noise)
    return (counter.ops, counter.copy_bytes) if with_copy_bytes else counter.ops


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="a prior config.json (e.g. a saved prior's prior/config.json)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grid", type=int, default=24)
    a = p.parse_args()
    with open(a.config) as f:
        cfg = json.load(f)
    for optimized in (False, True):
        ops, copied = lora_step_ops(cfg, optimized, a.batch, a.grid, with_copy_bytes=True)
        print(f"{'trainer' if optimized else 'before'}: {sum(ops.values())} ops, {ops['aten._to_copy.default']} dtype copies ({copied / 2**30:.2f} GiB)")
