"""SPADE baseline unit tests (CPU, tiny networks): options, shapes, losses against direct
computation, exact resume, sampling determinism and layout, equal maps with the SDM sampler."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.nn.utils import parametrize

from conftest import chest_stack, write_chest_stacks
from nodulesynth.data.slices import load_slices, save_slices
from nodulesynth.labels import NODULE, NUM_CLASSES
from nodulesynth.models.checkpoints import load_checkpoint
from nodulesynth.models.data import one_hot
from nodulesynth.models.spade import SPADEOptions, generate, load_spade, sample_spade, train_spade
from nodulesynth.models.spade.losses import (VGGLoss, build_vgg_loss, d_hinge_loss, feature_matching_loss,
                                             g_hinge_loss)
from nodulesynth.models.spade.networks import MultiscaleDiscriminator, SPADEGenerator, generator_widths
from nodulesynth.models.spade.train import LOSS_KEYS, SPADETrainer

TINY = dict(image_size=16, ngf=8, ndf=8, spade_hidden=8, batch_size=2)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: fastest on one thread


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    return write_chest_stacks(tmp_path_factory.mktemp("spade_slices"))


@pytest.fixture(scope="module")
def tiny_model(stacks, tmp_path_factory):
    out = tmp_path_factory.mktemp("spade_model")
    # 32 px: at 16 px the phantom lungs are too small to take a transplanted nodule.
    options = SPADEOptions(**{**TINY, "image_size": 32}, max_steps=3, checkpoint_every=2, log_every=1)
    return train_spade(stacks, out, options, device="cpu")


# ---------------------------------------------------------------- options

def test_options_from_config_and_derived_upsampling():
    with pytest.raises(KeyError, match=r"spade\.bogus"):
        SPADEOptions.from_config({"ngf": 16, "bogus": 1})
    options = SPADEOptions.from_config({"lr_g": "1e-4", "image_size": 64, "ema": "true", "vgg_weights": None})
    assert options.lr_g == 1e-4 and options.ema is True and options.vgg_weights is None
    # 8-px start as the paper's 256-px generator (5 upsamplings); explicit counts win.
    assert [SPADEOptions(image_size=s).upsampling for s in (256, 128, 64, 32, 16)] == [5, 4, 3, 2, 1]
    assert SPADEOptions(image_size=64, num_upsampling=5).start_size == 2
    defaults = SPADEOptions()
    assert (defaults.lr_g, defaults.lr_d, defaults.beta1, defaults.beta2) == (1e-4, 4e-4, 0.0, 0.9)
    assert (defaults.n_scales, defaults.n_layers_d, defaults.lambda_feat, defaults.spade_hidden) == (2, 4, 10.0, 128)
    with pytest.raises(ValueError, match="norm_g"):
        SPADEOptions(norm_g="group")
    with pytest.raises(ValueError, match="divisible"):
        SPADEOptions(image_size=48, num_upsampling=5)


# ---------------------------------------------------------------- networks

def test_generator_widths_match_the_paper():
    assert generator_widths(64, 5) == [1024, 512, 256, 128, 64]
    assert generator_widths(16, 2) == [32, 16]


@pytest.mark.parametrize("size,ngf,norm", [(16, 8, "instance"), (32, 8, "batch"), (48, 4, "instance")])
def test_generator_and_discriminator_shapes(size, ngf, norm):
    options = SPADEOptions(image_size=size, ngf=ngf, ndf=ngf, spade_hidden=8, norm_g=norm)
    torch.manual_seed(0)
    generator, discriminator = SPADEGenerator(options), MultiscaleDiscriminator(options)
    label = torch.randint(0, NUM_CLASSES, (2, size, size))
    seg = one_hot(label)
    fake = generator(seg)
    assert fake.shape == (2, 1, size, size)
    assert fake.abs().max() <= 1.0
    # The map drives the output (SPADE conditioning, no noise input).
    assert not torch.allclose(generator(one_hot(torch.roll(label, 3, dims=1))), fake)
    outputs = discriminator(seg, fake)
    assert len(outputs) == options.n_scales == 2
    for scale in outputs:
        assert len(scale) == options.n_layers_d + 1          # intermediate features + score map
        assert scale[-1].shape[:2] == (2, 1)
        assert [f.shape[1] for f in scale[:-1]] == [ngf, 2 * ngf, 4 * ngf, 8 * ngf]
    assert outputs[1][0].shape[-1] < outputs[0][0].shape[-1]    # second scale sees a half-size input
    # Spectral norm on the generator's block convs and on the discriminator's middle convs.
    assert parametrize.is_parametrized(generator.head_0.conv_0, "weight")
    assert parametrize.is_parametrized(discriminator.discriminators[0].layers[1][0], "weight")
    with pytest.raises(ValueError, match="expected a one-hot map"):
        generator(one_hot(torch.randint(0, NUM_CLASSES, (1, size * 2, size * 2))))


# ---------------------------------------------------------------- losses

def _fake_outputs(seed, scales=2, layers=3):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(2, 4, 5 - s, 5 - s, generator=g) for _ in range(layers)]
            + [torch.randn(2, 1, 4 - s, 4 - s, generator=g)] for s in range(scales)]


def test_hinge_losses_against_direct_computation():
    real, fake = _fake_outputs(1), _fake_outputs(2)
    d_real, d_fake = d_hinge_loss(real, fake)
    g = g_hinge_loss(fake)
    np_real = [s[-1].numpy().astype(np.float64) for s in real]
    np_fake = [s[-1].numpy().astype(np.float64) for s in fake]
    expect_real = np.mean([np.mean(np.maximum(0.0, 1.0 - x)) for x in np_real])
    expect_fake = np.mean([np.mean(np.maximum(0.0, 1.0 + x)) for x in np_fake])
    expect_g = np.mean([-np.mean(x) for x in np_fake])
    assert d_real.item() == pytest.approx(expect_real, rel=1e-6)
    assert d_fake.item() == pytest.approx(expect_fake, rel=1e-6)
    assert g.item() == pytest.approx(expect_g, rel=1e-6, abs=1e-7)
    # The hinge saturates: confident correct scores contribute nothing.
    d_real, d_fake = d_hinge_loss([[torch.full((1, 1, 2, 2), 3.0)]], [[torch.full((1, 1, 2, 2), -3.0)]])
    assert d_real.item() == d_fake.item() == 0.0


def test_feature_matching_against_direct_computation():
    fake, real = _fake_outputs(3), _fake_outputs(4)
    for scale in fake + real:
        for f in scale:
            f.requires_grad_(True)
    loss = feature_matching_loss(fake, real, lambda_feat=10.0)
    per_scale = [sum(np.mean(np.abs(a.detach().numpy() - b.detach().numpy())) for a, b in zip(fs[:-1], rs[:-1]))
                 for fs, rs in zip(fake, real)]
    assert loss.item() == pytest.approx(10.0 * np.mean(per_scale), rel=1e-6)
    assert feature_matching_loss(fake, fake, 10.0).item() == 0.0
    loss.backward()
    assert all(f.grad is None for scale in real for f in scale)  # real features are targets only
    assert fake[0][0].grad is not None and fake[0][-1].grad is None  # the score map is not matched


def test_vgg_loss_refuses_without_a_weights_file(tmp_path, capsys):
    with pytest.raises(ValueError, match="local VGG19 weights"):
        VGGLoss(None)
    with pytest.raises(FileNotFoundError, match=r"spade.vgg_weights: .*missing\.pth does not exist"):
        VGGLoss(tmp_path / "missing.pth")
    with pytest.warns(UserWarning, match="VGG perceptual loss OFF although spade.lambda_vgg is 10"):
        assert build_vgg_loss(SPADEOptions()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: said, not warned
        assert build_vgg_loss(SPADEOptions(lambda_vgg=0)) is None
    assert "VGG perceptual loss off (lambda_vgg 0)" in capsys.readouterr().err


def test_vgg_loss_loads_a_local_file(tmp_path):
    """ONLY a loading test: the file holds randomly initialised VGG19 convs, written here to check
    that a local torchvision-layout file is read (full-model key names); no real weights exist here."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["E"])
    path = tmp_path / "vgg19_random_init.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loss = VGGLoss(path)
    assert torch.equal(loss.slices[0][0].weight, features[0].weight)
    assert not any(p.requires_grad for p in loss.parameters())
    a = torch.rand(1, 1, 32, 32) * 2 - 1
    assert loss(a, a).item() == 0.0
    assert loss(a, -a).item() > 0.0
    options = SPADEOptions(vgg_weights=str(path))
    assert isinstance(build_vgg_loss(options), VGGLoss)
    torch.save({"0.weight": features[0].weight}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError):  # strict: a file missing convs is refused, not padded with random ones
        VGGLoss(tmp_path / "partial.pth")


# ---------------------------------------------------------------- training and resume

def test_loader_threads_train_the_same_model(stacks, tmp_path):
    options = SPADEOptions(**TINY, max_steps=3, checkpoint_every=2, log_every=1, seed=3)
    a = load_checkpoint(train_spade(stacks, tmp_path / "alone", options, device="cpu"))
    b = load_checkpoint(train_spade(stacks, tmp_path / "threaded", options, device="cpu", workers=2))
    for key in a["generator"]:
        assert torch.equal(a["generator"][key], b["generator"][key]), key


@pytest.mark.parametrize("ema", [False, True])
def test_resume_equals_unbroken_training(stacks, tmp_path, ema):
    options = SPADEOptions(**TINY, max_steps=6, checkpoint_every=2, log_every=1, ema=ema, ema_decay=0.9, seed=3)
    unbroken = train_spade(stacks, tmp_path / "unbroken", options, device="cpu")
    # A "kill" after step 3: the last checkpoint is step 2, step 3 is lost and replayed.
    stopped = train_spade(stacks, tmp_path / "resumed", options, device="cpu", max_steps_this_run=3)
    assert stopped.name == "checkpoint.pt" and not (tmp_path / "resumed" / "model.pt").exists()
    assert load_checkpoint(stopped)["step"] == 2
    resumed = train_spade(stacks, tmp_path / "resumed", options, device="cpu")

    a, b = load_checkpoint(unbroken), load_checkpoint(resumed)
    assert a["step"] == b["step"] == 6 and a["ema"] is b["ema"] is ema
    for key in a["generator"]:
        assert torch.equal(a["generator"][key], b["generator"][key]), key
    ca = load_checkpoint(tmp_path / "unbroken" / "checkpoint.pt")
    cb = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    for key in ca["discriminator"]:
        assert torch.equal(ca["discriminator"][key], cb["discriminator"][key]), key
    def losses(rows):  # timings differ between runs, losses must not
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]
    assert losses(ca["curve"]) == losses(cb["curve"])
    assert [r["step"] for r in ca["curve"]] == list(range(1, 7))
    header = (tmp_path / "resumed" / "loss.tsv").read_text().splitlines()[0].split("\t")
    assert {"step", "g_gan", "g_feat", "d_real", "d_fake", "images_per_s"} <= set(header)
    # Training moved the weights (so the equality above is not trivially about untouched ones).
    fresh = SPADEGenerator(options).state_dict()
    assert not torch.equal(fresh["conv_img.weight"], a["generator"]["conv_img.weight"])


def test_changed_options_train_from_scratch_instead_of_resuming(stacks, tmp_path):
    """A rerun after a config change must not resume the old checkpoint: it trains afresh."""
    options = SPADEOptions(**TINY, max_steps=2, checkpoint_every=1)
    train_spade(stacks, tmp_path / "m", options, device="cpu")
    for change in ({"ngf": 4}, {"lr_g": 2e-4}):
        new = options.replace(**change)
        rerun = load_checkpoint(train_spade(stacks, tmp_path / "m", new, device="cpu"))
        fresh = load_checkpoint(train_spade(stacks, tmp_path / f"fresh_{list(change)[0]}", new, device="cpu"))
        assert rerun["step"] == 2
        assert all(torch.equal(rerun["generator"][k], fresh["generator"][k]) for k in fresh["generator"])
    # Only the length changed: the checkpoint is resumed at step 2.
    resumed = train_spade(stacks, tmp_path / "m", new.replace(max_steps=3), device="cpu", max_steps_this_run=0)
    assert load_checkpoint(resumed)["step"] == 2


def test_a_shorter_run_after_a_longer_one_trains_afresh(stacks, tmp_path, capsys):
    """spade.max_steps lowered after a finished run: the checkpoint past it is not resumed (its weights are not a
    run of the new length's), so the model is what a fresh run of that length gives."""
    options = SPADEOptions(**TINY, max_steps=3, checkpoint_every=1)
    train_spade(stacks, tmp_path / "m", options, device="cpu")
    capsys.readouterr()
    shorter = load_checkpoint(train_spade(stacks, tmp_path / "m", options.replace(max_steps=2), device="cpu"))
    assert "its step 3 is past spade.max_steps 2" in capsys.readouterr().err
    fresh = load_checkpoint(train_spade(stacks, tmp_path / "fresh", options.replace(max_steps=2), device="cpu"))
    assert shorter["step"] == fresh["step"] == 2
    assert all(torch.equal(shorter["generator"][k], fresh["generator"][k]) for k in fresh["generator"])


def test_checkpoint_is_bound_to_its_training_data(tmp_path, capsys):
    """Trained on stack A, rerun on stack B with the same options: the run must train afresh on B (the
    old checkpoint of A used to be written out as B's model, bit-identical to A's)."""
    stack_a, stack_b = tmp_path / "a" / "scan0.npz", tmp_path / "b" / "scan0.npz"
    save_slices(stack_a, chest_stack("scan0", "P0", seed=0))
    save_slices(stack_b, chest_stack("scan0", "P0", seed=1, nodule_every=2))
    options = SPADEOptions(**TINY, max_steps=2, checkpoint_every=1)
    model_a = load_checkpoint(train_spade([stack_a], tmp_path / "m", options, device="cpu"))
    capsys.readouterr()
    model_b = load_checkpoint(train_spade([stack_b], tmp_path / "m", options, device="cpu"))
    log = capsys.readouterr().err
    assert "not resuming" in log and "trained on other data: 1 scans changed (scan0)" in log and "afresh" in log
    assert not all(torch.equal(model_a["generator"][k], model_b["generator"][k]) for k in model_a["generator"])
    fresh = load_checkpoint(train_spade([stack_b], tmp_path / "fresh", options, device="cpu"))
    assert all(torch.equal(fresh["generator"][k], model_b["generator"][k]) for k in fresh["generator"])
    assert model_b["data"]["sha256"] == fresh["data"]["sha256"] != model_a["data"]["sha256"]
    # Back on A with a longer run: the checkpoint (now B's) is not resumed either.
    capsys.readouterr()
    train_spade([stack_a], tmp_path / "m", options.replace(max_steps=3), device="cpu", max_steps_this_run=0)
    assert "trained on other data" in capsys.readouterr().err


def test_perceptual_loss_off_is_recorded_and_warned_once(stacks, tmp_path):
    """lambda_vgg 10 without vgg_weights: not the paper's loss; the model's outputs say so."""
    options = SPADEOptions(**TINY, max_steps=2, checkpoint_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every warning issued, not only the first shown
        model = train_spade(stacks, tmp_path / "off", options, device="cpu")
    assert sum("VGG perceptual loss OFF" in str(w.message) for w in caught) == 1
    assert load_checkpoint(model)["perceptual_loss"] == "off (no vgg_weights)"
    written = yaml.safe_load((tmp_path / "off" / "options.yaml").read_text())
    assert written["perceptual_loss"] == "off (no vgg_weights)" and written["options"]["lambda_vgg"] == 10.0
    assert written["training_data"]["stacks"] == 2 and written["training_data"]["slices"] == 12
    model = train_spade(stacks, tmp_path / "zero", options.replace(lambda_vgg=0.0), device="cpu")
    assert load_checkpoint(model)["perceptual_loss"] == "off (lambda_vgg 0)"


def test_schema_defaults_are_the_options_defaults():
    schema = yaml.safe_load((Path(__file__).parents[1] / "schemas" / "config.schema.yaml").read_text())
    defaults = {k: v["default"] for k, v in schema["properties"]["spade"]["properties"].items()}
    assert SPADEOptions.from_config(defaults) == SPADEOptions()


# ---------------------------------------------------------------- sampling

def test_sampling_is_deterministic_and_in_the_slices_layout(tiny_model, stacks, tmp_path):
    generator, options = load_spade(tiny_model, "cpu")
    assert not generator.training and options.image_size == 32
    first = sample_spade(tiny_model, stacks, tmp_path / "a", fold="0", seed=5, max_slices_per_scan=4, batch_size=3)
    again = sample_spade(tiny_model, stacks, tmp_path / "b", fold="0", seed=5, max_slices_per_scan=4, batch_size=2)
    assert [p.name for p in first] == ["scan0.npz", "scan1.npz"]
    for p, q, source in zip(first, again, stacks):
        s, t, src = load_slices(p), load_slices(q), load_slices(source)
        assert s.image.dtype == np.uint8 and s.image.shape == s.label.shape == (4, 32, 32)
        assert np.array_equal(s.image, t.image) and np.array_equal(s.label, t.label)  # batch size irrelevant
        idx = s.extra["source_index"]
        assert np.array_equal(s.slice_index, src.slice_index[idx]) and np.array_equal(s.z, src.z[idx])
        assert np.array_equal(s.has_nodule, (s.label == NODULE).any((1, 2)))
        assert str(s.extra["generator"]) == "spade" and s.scan_id == src.scan_id
        # The image is the generator's output for exactly the stored map.
        assert np.array_equal(s.image, generate(generator, torch.from_numpy(s.label.astype(np.int64))))

    t1 = sample_spade(tiny_model, stacks, tmp_path / "t1", fold="0", seed=1, mask_source="transplant")
    t2 = sample_spade(tiny_model, stacks, tmp_path / "t2", fold="0", seed=1, mask_source="transplant")
    for p, q in zip(t1, t2):
        s, t = load_slices(p), load_slices(q)
        assert len(s) > 0 and s.has_nodule.all()
        assert np.array_equal(s.label, t.label) and np.array_equal(s.image, t.image)


def test_same_maps_as_the_sdm_sampler(tiny_model, stacks, tmp_path):
    """Both arms must synthesise from equal inputs: same slices, same transplanted maps."""
    from nodulesynth.models.checkpoints import save_checkpoint
    from nodulesynth.models.sdm import SDMOptions, sample_sdm
    from nodulesynth.models.sdm.train import FORMAT, build_model

    sdm_options = SDMOptions(image_size=32, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                             attention_resolutions=(), spade_hidden=8, norm_groups=4,
                             sampler="ddim", sample_steps=1)
    sdm_path = tmp_path / "sdm.pt"
    model = build_model(sdm_options, torch.device("cpu"))
    save_checkpoint(sdm_path, {"format": FORMAT, "step": 0, "options": sdm_options.to_dict(),
                               "model": model.state_dict()})
    for source, limit in (("real", 3), ("transplant", None)):
        spade_out = sample_spade(tiny_model, stacks, tmp_path / f"spade_{source}", fold="0",
                                 seed=7, mask_source=source,
                                 max_slices_per_scan=limit)
        sdm_out = sample_sdm(sdm_path, stacks, tmp_path / f"sdm_{source}", fold="0", seed=7, mask_source=source,
                             max_slices_per_scan=limit, device="cpu")
        for p, q in zip(spade_out, sdm_out, strict=True):
            s, t = load_slices(p), load_slices(q)
            assert p.name == q.name
            assert len(s) > 0 and np.array_equal(s.label, t.label), source
            assert np.array_equal(s.slice_index, t.slice_index) and np.array_equal(s.z, t.z)


def test_bf16_step_runs_under_autocast_and_returns_losses_without_a_host_sync():
    # On the CPU bf16 is off unless forced; forced, the same autocast code a GPU runs trains a step. The losses
    # come back as 0-d fp32 tensors (not floats): reading them, a host sync on a GPU, is the caller's choice.
    options = SPADEOptions(**TINY, max_steps=2, seed=1)
    assert SPADETrainer(options, "cpu").bf16 is False and options.bf16 is True
    trainer = SPADETrainer(options, "cpu", bf16=True)
    rng = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 16, 16, generator=rng) * 2 - 1
    label = torch.randint(0, 6, (2, 16, 16), generator=rng)
    before = trainer.generator.conv_img.weight.detach().clone()
    losses = trainer.training_step(image, label)
    assert set(losses) == set(LOSS_KEYS)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32 for v in losses.values())
    assert all(torch.isfinite(v) for v in losses.values())
    assert trainer.generator.conv_img.weight.dtype == torch.float32  # weights stay fp32 under autocast
    assert not torch.equal(before, trainer.generator.conv_img.weight)
