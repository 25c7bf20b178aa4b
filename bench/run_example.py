"""Run the public diffusers example `train_text_to_image_lora_prior.py` as it is, offline, on current diffusers.

    python -m bench.run_example EXAMPLE_SCRIPT [the example's flags ...]

The example's file is not changed and not shipped here (it is the diffusers project's code: get it from
diffusers' `examples/wuerstchen/text_to_image/`, beside its `modeling_efficient_net_encoder.py`). Three
stand-ins are installed before it runs, each only so that it starts offline on today's packages:

1. `diffusers.pipelines.wuerstchen` is an alias of `diffusers.pipelines.deprecated.wuerstchen`, where
   diffusers 0.38+ moved the classes (the only change the example needs to import);
2. `efficientnet_v2_s(weights="DEFAULT")` builds without downloading ImageNet weights: the example
   overwrites every one of them with the Stage-B checkpoint's `effnet_state_dict` right after;
3. `hf_hub_download("dome272/wuerstchen", "model_v2_stage_b.pt")` returns the local file named by
   $EXAMPLE_IMAGE_ENCODER (a .pt holding `effnet_state_dict`, the layout of the real file).

One observer: `Accelerator.log`, which the example calls once per optimiser step with `train_loss`,
also records the time and the loss, written as JSON to $EXAMPLE_LOG at exit (seconds per step and the
loss curve for the learning benchmark).
"""

import atexit
import json
import os
import runpy
import sys
import time


def install_stand_ins():
    import diffusers.pipelines.deprecated.wuerstchen as moved

    sys.modules.setdefault("diffusers.pipelines.wuerstchen", moved)

    import torchvision.models as tvm

    build = tvm.efficientnet_v2_s
    tvm.efficientnet_v2_s = lambda weights=None, **kw: build(weights=None, **kw)

    import huggingface_hub

    download = huggingface_hub.hf_hub_download

    def local_stage_b(repo_id, filename=None, **kw):
        if (repo_id, filename) == ("dome272/wuerstchen", "model_v2_stage_b.pt") and os.environ.get("EXAMPLE_IMAGE_ENCODER"):
            return os.environ["EXAMPLE_IMAGE_ENCODER"]
        return download(repo_id, filename=filename, **kw)

    huggingface_hub.hf_hub_download = local_stage_b


def observe_steps(path):
    import accelerate

    log, record = accelerate.Accelerator.log, []

    def observed(self, values, step=None, log_kwargs=None):
        if "train_loss" in values:
            record.append([step, time.perf_counter(), float(values["train_loss"])])
        return log(self, values, step=step, log_kwargs=log_kwargs or {})

    accelerate.Accelerator.log = observed

    def write():
        with open(path, "w") as f:
            json.dump(record, f)

    atexit.register(write)


def main():
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script] + sys.argv[2:]
    install_stand_ins()
    if os.environ.get("EXAMPLE_LOG"):
        observe_steps(os.environ["EXAMPLE_LOG"])
    sys.path.insert(0, os.path.dirname(script))  # its `from modeling_efficient_net_encoder import ...`
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
