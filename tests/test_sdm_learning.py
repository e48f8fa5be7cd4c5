"""Learning test: a small SDM trained for a few minutes on the demo slices draws the anatomy it is asked for.

Figures measured while writing this test (one CPU thread, 64 px, 300 steps of batch 8 = ~2.5 min;
16 demo maps, DPM-Solver++ 20 steps, guidance 1.5; Dice of the mask stage's segmentation of each
sample against its conditioning map):

                   body   left lung   right lung
    trained        0.94     0.74        0.72
    untrained      0.32     0.25        0.26

(for reference: the same segmentation of the real slices resized to 64 px gives 0.96 / 0.95 / 0.96).
The thresholds below leave room for run-to-run and platform differences.
"""

import numpy as np
import pytest
import torch

from nodulesynth.data.slices import load_training_pairs
from nodulesynth.models.data import SlicePairs
from nodulesynth.models.sdm import SDMOptions, load_sdm, sample_images, train_sdm
from nodulesynth.models.sdm.unet import SDMUNet

DEMO = SDMOptions(image_size=64, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(16,), num_head_channels=32, spade_hidden=16, resblock_updown=False,
                  batch_size=8, lr=2e-3, ema_decay=0.995, ema_warmup=True, max_steps=300, log_every=50,
                  checkpoint_every=1000, finetune_steps=0, grad_clip=1.0,
                  grad_checkpoint=False)  # the demo recipe (config.yaml)


@pytest.mark.slow
def test_sdm_learns_mask_fidelity(demo_slice_paths, tmp_path, one_thread):
    from nodulesynth.masks.fidelity import mask_fidelity

    model_path = train_sdm(demo_slice_paths, tmp_path / "sdm", DEMO, device="cpu")
    model, diffusion, options = load_sdm(model_path, "cpu")

    _, labels = load_training_pairs(demo_slice_paths)
    maps = SlicePairs(np.zeros_like(labels), labels, options.image_size)
    maps = maps.batch(np.round(np.linspace(0, len(maps) - 1, 16)).astype(int))[1]

    def fidelity(network):
        images = sample_images(network, diffusion, maps, "dpmpp_2m", 20, 1.5, torch.Generator().manual_seed(0))
        return mask_fidelity(images, maps.numpy().astype(np.uint8))

    untrained = SDMUNet(options).eval()
    trained_scores, untrained_scores = fidelity(model), fidelity(untrained)
    print("trained", trained_scores, "\nuntrained", untrained_scores)
    for name, floor in (("body", 0.8), ("left_lung", 0.5), ("right_lung", 0.5)):
        assert trained_scores[name] > floor, (name, trained_scores, untrained_scores)
        assert trained_scores[name] > untrained_scores[name] + 0.2, (name, trained_scores, untrained_scores)
