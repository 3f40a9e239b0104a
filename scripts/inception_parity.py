"""Check lcm's FID Inception against torch-fidelity's (the network behind torchmetrics' FID), same random weights.

    pip install --no-deps --target /tmp/tfid torch-fidelity==0.4.0
    python scripts/inception_parity.py /tmp/tfid

torch-fidelity needs torchvision at import time for its other extractors, so only its Inception module is loaded
here, under a stand-in package. Both networks get the same random weights (BatchNorm statistics included) and the
same uint8 images at several sizes; the script prints the largest relative difference of the 2048-d features and
of the TF1 resize, and exits non-zero above 1e-4.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

from lcm.evaluation.inception import FIDInception, resize_bilinear_tf1


def load_reference(site: Path):
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(site / "torch_fidelity")]
    sys.modules["torch_fidelity"] = package
    spec = importlib.util.spec_from_file_location(
        "torch_fidelity.feature_extractor_inceptionv3", site / "torch_fidelity" / "feature_extractor_inceptionv3.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    site = Path(sys.argv[1])
    ref_module = load_reference(site)
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    torch.manual_seed(0)
    ours = FIDInception().eval()
    state = {}
    for name, tensor in ours.state_dict().items():
        if name.endswith("running_var"):
            state[name] = torch.rand_like(tensor) + 0.5
        elif name.endswith("num_batches_tracked"):
            state[name] = tensor
        else:
            state[name] = torch.randn_like(tensor) * (0.1 if name.endswith(("running_mean", "bias")) else 1.0)
    # conv weights scaled so activations neither vanish nor explode through 94 layers
    for name, tensor in state.items():
        if name.endswith("conv.weight"):
            state[name] = tensor * (2.0 / tensor[0].numel()) ** 0.5
    ours.load_state_dict(state)
    path = Path("/tmp/inception_parity_weights.pth")
    torch.save(state, path)
    ref = ref_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)

    worst = 0.0
    for size in (28, 32, 64, 299, 512):
        g = torch.Generator().manual_seed(size)
        images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            a = ours(images)
            (b,) = ref(images)
        resized = resize_bilinear_tf1(images.float(), (299, 299))
        expected = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        feat_rel = float((a - b).abs().max() / b.abs().max())
        resize_rel = float((resized - expected).abs().max() / 255)
        worst = max(worst, feat_rel, resize_rel)
        print(
            f"{size:>4}x{size:<4} features max rel diff {feat_rel:.2e} (|f| max {float(b.abs().max()):.3g}), "
            f"resize {resize_rel:.2e}"
        )
    print(f"worst {worst:.2e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
