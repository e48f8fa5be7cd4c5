"""Unit tests of the semantic diffusion model (CPU, tiny networks, seconds)."""

import math
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy import ndimage, stats

from conftest import chest_image, chest_map, write_chest_stacks
from nodulesynth.data.slices import load_slices, save_slices
from nodulesynth.labels import BODY, LEFT_LUNG, NODULE, RIGHT_LUNG
from nodulesynth.models.checkpoints import load_checkpoint, save_checkpoint
from nodulesynth.models.data import Prefetched, SlicePairs, load_training_data, loader_workers, one_hot, training_data
from nodulesynth.models.ema import EMA
from nodulesynth.models.records import LossCurve
from nodulesynth.models.sdm import SDMOptions, load_sdm, sample_images, sample_sdm, train_sdm
from nodulesynth.models.sdm.diffusion import (GaussianDiffusion, cosine_betas, discretized_gaussian_log_likelihood,
                                              linear_betas, spaced_timesteps)
from nodulesynth.models.sdm.samplers import SAMPLERS, guided_model, sample_ddim, sample_ddpm, sample_dpmpp_2m
from nodulesynth.models.sdm.train import Trainer, draw_batch
from nodulesynth.models.sdm.unet import SDMUNet, SPADEGroupNorm, set_attention, timestep_embedding
from nodulesynth.models.seeding import step_generator
from nodulesynth.models.synthesis import plan_maps
from nodulesynth.models.transplant import choose_maps, nodule_shapes, transplant_nodule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: fastest on one thread

TINY = dict(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
            num_head_channels=8, spade_hidden=16, diffusion_steps=40, batch_size=4, sample_steps=5,
            sample_batch_size=8, ema_decay=0.9, log_every=1, checkpoint_every=1000, finetune_steps=0)


def tiny(**changes) -> SDMOptions:
    return SDMOptions(**{**TINY, **changes})


def randomize(model, seed=0, scale=0.2):
    """Give every weight (also the zero-initialised output layers) a random value, so that outputs
    depend on all inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


# --- common utilities --------------------------------------------------------------------------


def test_step_generator_depends_on_seed_and_step_only():
    a = torch.rand(5, generator=step_generator(3, 7))
    assert torch.equal(a, torch.rand(5, generator=step_generator(3, 7)))
    assert not torch.equal(a, torch.rand(5, generator=step_generator(3, 8)))
    assert not torch.equal(a, torch.rand(5, generator=step_generator(4, 7)))


def test_ema_update_and_copy(tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], 0.9 * before + 0.1 * model.weight)
    save_checkpoint(tmp_path / "ema.pt", {"ema": ema.state_dict()})
    other = EMA(torch.nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(load_checkpoint(tmp_path / "ema.pt")["ema"])
    target = torch.nn.Linear(3, 2)
    other.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"]) and other.decay == 0.9


def test_slice_pairs_and_one_hot():
    rng = np.random.default_rng(0)
    labels = np.stack([chest_map(32) for _ in range(3)])
    images = np.stack([chest_image(lb, rng) for lb in labels])
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    pairs = SlicePairs(images, labels, 16)
    assert len(pairs) == 3 and [a.dtype for a in pairs.arrays()] == [np.uint8, np.uint8]
    image, label = pairs.batch([0, 1, 2])
    assert image.shape == (3, 1, 16, 16) and label.shape == (3, 16, 16)
    assert image.dtype == torch.float32 and label.dtype == torch.long
    assert image.min() >= -1 and image.max() <= 1
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, 4}  # nearest: no invented classes
    image2, label2 = pairs.batch(torch.tensor([2, 0]))
    assert torch.equal(label2[1], label[0]) and torch.equal(image2[0], image[2])
    with pytest.raises(IndexError):
        pairs.batch([3])
    oh = one_hot(label2)
    assert oh.shape == (2, 6, 16, 16) and torch.equal(oh.sum(1), torch.ones(2, 16, 16))


def test_training_data_is_uint8_memory_mapped_and_read_one_stack_at_a_time(tmp_path):
    """The training set must not be held in memory (as float32 images and int64 labels it took 786 KB a
    256-px slice, and a real fold did not fit its 16 GB): it is staged as uint8 memory-mapped files, one
    per stack, and each batch is converted when drawn, to exactly what the whole-set conversion gave."""
    paths = write_chest_stacks(tmp_path / "slices", count=3, n=5, size=32)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    data, record = load_training_data(paths[::-1], 16, scratch)
    assert len(data) == 15 and [s["scan_id"] for s in record["stacks"]] == ["scan0", "scan1", "scan2"]
    arrays = data.arrays()
    assert len(arrays) == 6 and all(isinstance(a, np.memmap) and a.dtype == np.uint8 and a.shape == (5, 16, 16)
                                    for a in arrays)
    assert all(Path(a.filename).parent == scratch for a in arrays)
    stacks = [load_slices(p) for p in paths]
    expected = SlicePairs(np.concatenate([s.image for s in stacks]), np.concatenate([s.label for s in stacks]), 16)
    index = torch.tensor([14, 0, 7, 7, 5, 4])
    for got, want in zip(data.batch(index), expected.batch(index)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # Reading pages back after they were dropped from the mapping changes nothing.
    data._drop_mapped_pages()
    assert torch.equal(data.batch(index)[0], expected.batch(index)[0])
    with training_data(paths, 16, tmp_path) as (staged, again):
        assert again == record and len(staged) == 15
        folder = Path(staged.arrays()[0].filename).parent
        assert folder.parent == tmp_path and folder.exists()
    assert not folder.exists()  # the scratch files go with the run


def test_sampling_plans_hold_one_stack_at_a_time(tmp_path):
    """Sampling plans used to load every stack at full resolution at once: now each stack is read when
    its plan is reached and released before the next one is read."""
    paths = write_chest_stacks(tmp_path / "slices", count=4, n=3)
    plans = plan_maps(paths, 32, seed=0, mask_source="transplant", max_slices_per_scan=2)
    assert len(plans) == 4
    alive = []
    for stack, scan_id, indices, maps in plans:
        alive.append(weakref.ref(stack))
        assert sum(ref() is not None for ref in alive) == 1, "an earlier stack is still held"
        assert maps.shape[1:] == (32, 32) and len(indices) == len(maps)
        del stack
    assert [scan_id for _, scan_id, _, _ in plans] == ["scan0", "scan1", "scan2", "scan3"]  # iterable again


def test_loss_curve_roundtrip(tmp_path):
    curve = LossCurve()
    for step in range(1, 5):
        curve.append(step, loss=1.0 / step, mse=0.5)
    curve.write(tmp_path / "loss.tsv")
    loaded = LossCurve.load(tmp_path / "loss.tsv")
    assert loaded.rows == curve.rows
    loaded.truncate(2)
    assert [r["step"] for r in loaded.rows] == [1, 2]


# --- options and network -----------------------------------------------------------------------


def test_options_from_config():
    options = SDMOptions.from_config({"image_size": 64, "channel_mult": [1, 2], "attention_resolutions": [32]})
    assert options.channel_mult == (1, 2) and options.attention_resolutions == (32,)
    assert SDMOptions().model_channels == 256 and SDMOptions().guidance_scale == 1.5
    with pytest.raises(KeyError, match="sdm.no_such_key"):
        SDMOptions.from_config({"no_such_key": 1})
    with pytest.raises(ValueError, match="sdm.noise_schedule must be one of .* got 'quadratic'"):
        SDMOptions.from_config({"noise_schedule": "quadratic"})
    assert SDMOptions.from_config(options.to_dict()) == options


def test_unet_shapes_and_encoder_ignores_map():
    options = tiny()
    model = randomize(SDMUNet(options))
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 10, 39])
    cond_a = one_hot(torch.randint(6, (3, 16, 16)))
    cond_b = one_hot(torch.randint(6, (3, 16, 16)))
    encoder_outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: encoder_outputs.append(o)) for m in model.input_blocks]
    out_a = model(x, t, cond_a)
    out_b = model(x, t, cond_b)
    for h in hooks:
        h.remove()
    assert out_a.shape == (3, 2, 16, 16)
    half = len(encoder_outputs) // 2
    assert all(torch.equal(a, b) for a, b in zip(encoder_outputs[:half], encoder_outputs[half:]))
    assert not torch.allclose(out_a, out_b)  # ... but the decoder does
    assert not torch.allclose(out_a, model(x, t + 1, cond_a))  # and the timestep matters
    assert SDMUNet(tiny(learn_sigma=False))(x, t, cond_a).shape == (3, 1, 16, 16)
    # The decoder's residual blocks are semantic, the encoder's are not.
    assert all(b.spade for s in model.output_blocks for b in s if hasattr(b, "spade"))
    assert not any(b.spade for s in model.input_blocks for b in s if hasattr(b, "spade"))


def test_unet_resampling_variants_and_attention_impls_agree():
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 30])
    cond = one_hot(torch.randint(6, (2, 16, 16)))
    model = randomize(SDMUNet(tiny(resblock_updown=False)))
    assert model(x, t, cond).shape == (2, 2, 16, 16)
    sdpa = model(x, t, cond)
    set_attention(model, "plain")
    assert torch.allclose(sdpa, model(x, t, cond), atol=1e-5)


def test_spade_group_norm_formula():
    norm = randomize(SPADEGroupNorm(8, 6, hidden=4, groups=4), seed=1)
    x = torch.randn(2, 8, 4, 4)
    label = torch.randint(6, (2, 16, 16))
    segmap = one_hot(label)
    small = F.interpolate(segmap, size=(4, 4), mode="nearest")
    assert torch.equal(small, one_hot(label[:, ::4, ::4]))  # nearest: a one-hot map stays one-hot
    hidden = F.relu(F.conv2d(small, norm.shared[0].weight, norm.shared[0].bias, padding=1))
    w, b = norm.gamma_beta.weight, norm.gamma_beta.bias
    gamma = F.conv2d(hidden, w[:8], b[:8], padding=1)
    beta = F.conv2d(hidden, w[8:], b[8:], padding=1)
    expected = F.group_norm(x, 4) * (1 + gamma) + beta
    assert torch.allclose(norm(x, small), expected, atol=1e-5)


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 5]), 16)
    assert emb.shape == (2, 16)
    assert torch.equal(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    assert math.isclose(emb[1, 1].item(), math.cos(5 * math.exp(-math.log(10000) / 8)), rel_tol=1e-5)


# --- diffusion maths ---------------------------------------------------------------------------


def test_schedules_and_respacing():
    betas = linear_betas(1000)
    assert math.isclose(betas[0], 1e-4) and math.isclose(betas[-1], 0.02)
    cos = cosine_betas(100)
    abar = np.cumprod(1 - cos)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert np.allclose(abar[:90], [f((i + 1) / 100) / f(0) for i in range(90)])
    full = GaussianDiffusion(linear_betas(40))
    assert np.allclose(full.respaced(40).betas, full.betas)
    keep = spaced_timesteps(40, 5)
    assert keep.tolist() == [0, 10, 20, 29, 39]
    spaced = full.respaced(5)
    assert np.allclose(spaced.alphas_cumprod, full.alphas_cumprod[keep])
    assert spaced.timestep_map.tolist() == keep.tolist()
    assert spaced.model_t(torch.tensor([0, 4])).tolist() == [0, 39]


def test_learned_range_variance_matches_formula():
    diffusion = GaussianDiffusion(linear_betas(40)).respaced(8)  # respaced: uses the respaced betas
    t = torch.arange(8)
    v = torch.rand(8, 1, 3, 3) * 2 - 1
    x = torch.zeros_like(v)
    betas = 1 - diffusion.alphas_cumprod / np.append(1.0, diffusion.alphas_cumprod[:-1])
    abar_prev = np.append(1.0, diffusion.alphas_cumprod[:-1])
    posterior = betas * (1 - abar_prev) / (1 - diffusion.alphas_cumprod)
    clipped = np.log(np.append(posterior[1], posterior[1:]))
    frac = (v.double().numpy() + 1) / 2
    expected = frac * np.log(betas)[:, None, None, None] + (1 - frac) * clipped[:, None, None, None]
    got = diffusion.model_log_variance(v, t, x)
    assert np.allclose(got.numpy(), expected, atol=1e-5)
    # v = 1 -> beta_t, v = -1 -> the clipped posterior variance
    assert np.allclose(diffusion.model_log_variance(torch.ones_like(v), t, x)[:, 0, 0, 0].numpy(), np.log(betas), atol=1e-5)
    assert np.allclose(diffusion.model_log_variance(-torch.ones_like(v), t, x)[:, 0, 0, 0].numpy(), clipped, atol=1e-5)


def test_hybrid_loss_matches_direct_computation():
    torch.manual_seed(0)
    T, lam = 40, 0.001
    diffusion = GaussianDiffusion(linear_betas(T))
    b = 4
    x0 = (torch.randint(0, 256, (b, 1, 6, 6)).float() / 127.5 - 1)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # both edge bins
    t = torch.tensor([0, 1, 17, 39])
    noise = torch.randn_like(x0)
    xt = diffusion.q_sample(x0, t, noise)
    output = torch.cat([noise + 0.3 * torch.randn_like(x0), torch.rand_like(x0) * 2 - 1], 1).requires_grad_(True)
    losses = diffusion.training_losses(output, x0, xt, t, noise, vlb_weight=lam)

    # Direct computation in float64 numpy / scipy.
    bt = linear_betas(T)
    ab = np.cumprod(1 - bt)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = bt * (1 - ab_prev) / (1 - ab)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    X0, XT, N = x0.double().numpy(), xt.detach().double().numpy(), noise.double().numpy()
    eps, v = output[:, :1].detach().double().numpy(), output[:, 1:].detach().double().numpy()
    for i, ti in enumerate(t.tolist()):
        mse = np.mean((N[i] - eps[i]) ** 2)
        x0_hat = (XT[i] - np.sqrt(1 - ab[ti]) * eps[i]) / np.sqrt(ab[ti])
        c1 = bt[ti] * np.sqrt(ab_prev[ti]) / (1 - ab[ti])
        c2 = (1 - ab_prev[ti]) * np.sqrt(1 - bt[ti]) / (1 - ab[ti])
        mean = c1 * x0_hat + c2 * XT[i]
        frac = (v[i] + 1) / 2
        logvar = frac * np.log(bt[ti]) + (1 - frac) * post_logvar[ti]
        if ti == 0:
            sd = np.exp(0.5 * logvar)
            hi = np.where(X0[i] > 0.999, np.inf, X0[i] + 1 / 255)
            lo = np.where(X0[i] < -0.999, -np.inf, X0[i] - 1 / 255)
            p = stats.norm.cdf(hi, mean, sd) - stats.norm.cdf(lo, mean, sd)
            term = -np.mean(np.log(p)) / np.log(2)
        else:
            true_mean = c1 * X0[i] + c2 * XT[i]
            kl = 0.5 * (-1 + logvar - post_logvar[ti] + np.exp(post_logvar[ti] - logvar)
                        + (true_mean - mean) ** 2 * np.exp(-logvar))
            term = np.mean(kl) / np.log(2)
        expected = mse + lam * T * term
        assert math.isclose(losses["mse"][i].item(), mse, rel_tol=1e-4)
        assert math.isclose(losses["loss"][i].item(), expected, rel_tol=1e-3, abs_tol=1e-5), (ti, losses["loss"][i], expected)

    # Stop-gradient: the VLB trains only the variance, eps gets exactly the MSE gradient.
    losses["loss"].sum().backward()
    eps_grad = output.grad[:, :1]
    expected_grad = 2 * (output[:, :1] - noise).detach() / 36
    assert torch.allclose(eps_grad, expected_grad, atol=1e-6)
    assert output.grad[:, 1:].abs().sum() > 0


def test_discretized_likelihood_is_a_distribution():
    # Summed over all 256 bins, the probabilities of one Gaussian add up to 1.
    values = torch.arange(256).double() / 127.5 - 1
    for mean, log_scale in ((0.1, -3.0), (-0.97, -4.0), (0.5, -1.0)):
        logp = discretized_gaussian_log_likelihood(values, torch.full_like(values, mean), torch.full_like(values, log_scale))
        assert math.isclose(torch.exp(logp).sum().item(), 1.0, rel_tol=1e-6)


# --- guidance and samplers ---------------------------------------------------------------------


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.batches, self.timesteps = model, 0, [], []

    def forward(self, x, t, cond):
        self.calls += 1
        self.batches.append(len(x))
        self.timesteps.append(t.clone())
        return self.model(x, t, cond)


def test_guidance_one_batched_pass_equals_formula():
    model = randomize(SDMUNet(tiny()))
    counting = Counting(model)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 20, 39])
    cond = one_hot(torch.randint(6, (3, 16, 16)))
    s = 1.5
    out = guided_model(counting, cond, s)(x, t)
    assert counting.calls == 1 and counting.batches == [6]
    with torch.no_grad():
        e_map, e_null = model(x, t, cond), model(x, t, torch.zeros_like(cond))
    assert torch.allclose(out[:, :1], e_null[:, :1] + s * (e_map[:, :1] - e_null[:, :1]), atol=1e-5)
    assert torch.allclose(out[:, 1:], e_map[:, 1:], atol=1e-5)  # variance from the conditional branch
    assert not torch.allclose(out[:, :1], e_map[:, :1], atol=1e-3)
    counting.calls = 0
    assert torch.allclose(guided_model(counting, cond, 1.0)(x, t), e_map, atol=1e-5) and counting.calls == 1


def test_one_list_of_samplers():
    from nodulesynth.models.sdm import options as sdm_options, samplers

    schema = yaml.safe_load((Path(__file__).parents[1] / "schemas" / "config.schema.yaml").read_text())
    assert tuple(samplers.SAMPLERS) == sdm_options.SAMPLERS
    assert tuple(schema["properties"]["sdm"]["properties"]["sampler"]["enum"]) == sdm_options.SAMPLERS


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"])
def test_samplers_deterministic_and_finite(sampler):
    options = tiny()
    model = randomize(SDMUNet(options), scale=0.05)
    model.options = options
    diffusion = GaussianDiffusion.from_options(options)
    labels = torch.from_numpy(np.stack([chest_map(16), chest_map(16, (8, 5, 2))]).astype(np.int64))
    run = lambda seed: sample_images(model, diffusion, labels, sampler, 6, 1.5,  # noqa: E731
                                     torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 16, 16) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_samplers_pass_original_timesteps():
    options = tiny()
    counting = Counting(randomize(SDMUNet(options), scale=0.05))
    diffusion = GaussianDiffusion.from_options(options)
    fn = guided_model(counting, one_hot(torch.zeros(1, 16, 16, dtype=torch.long)), 1.0)
    for sampler in (sample_ddpm, sample_ddim):
        counting.timesteps.clear()
        out = sampler(fn, diffusion, torch.randn(1, 1, 16, 16), 5, torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all()
        assert [int(t[0]) for t in counting.timesteps] == [39, 29, 20, 10, 0]
    # DPM-Solver++: log-SNR-uniform fractional times from the noisiest step down to step 0.
    counting.timesteps.clear()
    sample_dpmpp_2m(fn, diffusion, torch.randn(1, 1, 16, 16), 5)
    times = np.array([float(t[0]) for t in counting.timesteps])
    assert len(times) == 5 and times[0] == pytest.approx(39) and times[-1] == pytest.approx(0, abs=1e-6)
    assert (np.diff(times) < 0).all()
    abar = np.interp(times, np.arange(40), diffusion.alphas_cumprod)
    assert np.ptp(np.diff(0.5 * np.log(abar / (1 - abar)))) < 0.2  # evenly spaced in lambda


@pytest.mark.parametrize("sampler,T,steps", [("ddpm", 40, 40), ("ddpm", 40, 10), ("ddpm", 1000, 25),
                                             ("ddim", 1000, 1000), ("dpmpp_2m", 40, 10), ("dpmpp_2m", 1000, 25),
                                             ("dpmpp_2m_sde", 40, 20), ("dpmpp_2m_sde", 1000, 25),
                                             ("dpmpp_2m_sde", 1000, 200)])
def test_samplers_reach_the_data_distribution(sampler, T, steps):
    """With the exact eps of Gaussian data N(mu, s^2) (and, for DDPM, the exact reverse variance
    given as the learned-range v of the RESPACED process), every sampler must return samples with
    that mean and spread: checks the update coefficients, not just that something comes out.
    (DDIM with few steps is known to under-disperse on a linear schedule: tested at full length. The
    SDE solver's noise makes it a lower-order method: on the 40-step schedule it needs 20 steps, with
    std 0.20 / 0.28 / 0.30 at 5 / 10 / 20 steps.)"""
    mu, s = 0.2, 0.3
    diffusion = GaussianDiffusion(linear_betas(T))
    spaced = diffusion.respaced(steps)
    abar_all = diffusion.alphas_cumprod
    to_spaced = {int(orig): i for i, orig in enumerate(spaced.timestep_map)}

    def exact(x, t):
        a = torch.tensor(np.interp(t.double().numpy(), np.arange(T), abar_all)).view(-1, 1, 1, 1)
        eps = torch.sqrt(1 - a) * (x - torch.sqrt(a) * mu) / (a * s ** 2 + 1 - a)
        if sampler != "ddpm":
            return eps.float()
        # p(x_{t-1} | x_t) of Gaussian data: posterior variance + coef1^2 * Var(x0 | x_t).
        i = to_spaced[int(t[0])]
        var_x0 = s ** 2 * (1 - a) / (a * s ** 2 + 1 - a)
        var = spaced.posterior_variance[i] + spaced.posterior_mean_coef1[i] ** 2 * var_x0
        lo, hi = spaced.posterior_log_variance_clipped[i], np.log(spaced.betas[i])
        v = 2 * (torch.log(var) - lo) / (hi - lo) - 1
        return torch.cat([eps, v.expand_as(x)], 1).float()

    x = torch.randn(1, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[sampler](exact, diffusion, x, steps, torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - mu) < 0.02, out.mean()
    assert abs(out.std().item() - s) < 0.02, out.std()


# --- training, resume and sampling from files --------------------------------------------------


def _state(path):
    return load_checkpoint(path)


def test_resume_equals_unbroken_training(tmp_path):
    paths = write_chest_stacks(tmp_path / "slices")
    options = tiny(max_steps=6, checkpoint_every=3, dropout=0.1, drop_rate=0.3)

    unbroken = train_sdm(paths, tmp_path / "a", options, device="cpu")
    assert unbroken.name == "model.pt"

    out = tmp_path / "b"
    assert train_sdm(paths, out, options, device="cpu", max_steps_this_run=3).name == "checkpoint.pt"
    shutil.copy(out / "checkpoint.pt", tmp_path / "step3.pt")
    train_sdm(paths, out, options, device="cpu", max_steps_this_run=2)  # reaches step 5 ...
    assert _state(out / "checkpoint.pt")["step"] == 5
    shutil.copy(tmp_path / "step3.pt", out / "checkpoint.pt")  # ... then "killed": last checkpoint is step 3
    (out / "loss.tsv").unlink()  # and Snakemake removed the failed job's loss.tsv: the checkpoint carries the curve
    resumed = train_sdm(paths, out, options, device="cpu")

    a, b = _state(unbroken), _state(resumed)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ca, cb = _state(tmp_path / "a" / "checkpoint.pt"), _state(out / "checkpoint.pt")
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    la, lb = LossCurve.load(tmp_path / "a" / "loss.tsv"), LossCurve.load(out / "loss.tsv")
    assert [r["loss"] for r in la.rows] == [r["loss"] for r in lb.rows] and len(la.rows) == 6
    # A different seed trains differently (the comparison above can fail).
    other = train_sdm(paths, tmp_path / "c", options.replace(seed=1), device="cpu")
    assert not all(torch.equal(a["model"][k], _state(other)["model"][k]) for k in a["model"])


def test_loader_threads_draw_the_same_batches_ahead(tmp_path):
    """Prefetched: steps drawn ahead on threads are the steps drawn in place, in order and after a jump (a resume)."""
    (tmp_path / "staged").mkdir()
    data, _ = load_training_data(write_chest_stacks(tmp_path / "slices"), 16, tmp_path / "staged")
    options = tiny()
    draws = []

    def draw(step):
        draws.append(step)
        return draw_batch(data, options, step)

    with Prefetched(draw, workers=3) as batches:
        for step in [0, 1, 2, 7, 8, 3]:
            ahead, in_place = batches(step), draw_batch(data, options, step)
            assert all(torch.equal(a, b) for a, b in zip(ahead, in_place)), step
    assert set(draws) >= {0, 1, 2, 3, 4, 7, 8, 9}  # drawn ahead of being asked for
    assert loader_workers(1) == 0 and loader_workers(8) == 7  # the demo's one thread loads in the loop itself


def test_loader_threads_train_the_same_model(tmp_path):
    paths = write_chest_stacks(tmp_path / "slices")
    options = tiny(max_steps=4, checkpoint_every=2)
    alone = train_sdm(paths, tmp_path / "a", options, device="cpu")
    out = tmp_path / "b"
    train_sdm(paths, out, options, device="cpu", max_steps_this_run=3, workers=2)  # stops at 3, resumes from 2
    threaded = train_sdm(paths, out, options, device="cpu", workers=2)
    a, b = _state(alone), _state(threaded)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    la, lb = LossCurve.load(tmp_path / "a" / "loss.tsv"), LossCurve.load(out / "loss.tsv")
    assert [r["loss"] for r in la.rows] == [r["loss"] for r in lb.rows]


def test_changed_options_train_from_scratch_instead_of_resuming(tmp_path):
    """A rerun after a config change (Snakemake reruns on a changed param) must not resume the old
    checkpoint: it trains afresh and ends as an unbroken run with the new options would."""
    paths = write_chest_stacks(tmp_path / "slices", count=1)
    train_sdm(paths, tmp_path / "m", tiny(max_steps=2), device="cpu")  # a finished run, checkpoint at step 2
    for change in ({"model_channels": 8}, {"lr": 3e-4}):
        new = tiny(max_steps=2, **change)
        rerun = _state(train_sdm(paths, tmp_path / "m", new, device="cpu"))
        fresh = _state(train_sdm(paths, tmp_path / f"fresh{len(change)}{list(change)[0]}", new, device="cpu"))
        assert rerun["step"] == 2 and all(torch.equal(rerun["model"][k], fresh["model"][k]) for k in fresh["model"])
    # Only the length changed: the checkpoint is resumed and training goes on from step 2.
    longer = tiny(max_steps=3, lr=3e-4)
    assert _state(train_sdm(paths, tmp_path / "m", longer, device="cpu", max_steps_this_run=0))["step"] == 2


def test_checkpoint_is_bound_to_its_training_data(tmp_path, capsys):
    """Trained on stack A, rerun on stack B with the same options: the run must train afresh on B (the
    old checkpoint of A, resumed at its last step, used to be written out unchanged as B's model)."""
    options = tiny(max_steps=3)
    stack_a = write_chest_stacks(tmp_path / "a", count=1, seed=0)
    stack_b = write_chest_stacks(tmp_path / "b", count=1, seed=1)  # same scan id, other slices
    out = tmp_path / "model"
    model_a = _state(train_sdm(stack_a, out, options, device="cpu"))
    capsys.readouterr()
    model_b = _state(train_sdm(stack_b, out, options, device="cpu"))
    log = capsys.readouterr().err
    assert "not resuming" in log and "trained on other data: 1 scans changed (scan0)" in log and "afresh" in log
    assert not all(torch.equal(model_a["model"][k], model_b["model"][k]) for k in model_a["model"])
    fresh = _state(train_sdm(stack_b, tmp_path / "fresh", options, device="cpu"))
    assert all(torch.equal(fresh["model"][k], model_b["model"][k]) for k in fresh["model"])
    assert model_b["data"]["sha256"] == fresh["data"]["sha256"] != model_a["data"]["sha256"]
    assert [s["scan_id"] for s in model_b["data"]["stacks"]] == ["scan0"]
    written = yaml.safe_load((out / "options.yaml").read_text())
    assert written["training_data"]["sha256"] == model_b["data"]["sha256"] and written["options"]["max_steps"] == 3

    # The same content rewritten elsewhere, the paths in another order: the same data, resumed.
    two = write_chest_stacks(tmp_path / "two", count=2)
    train_sdm(two, tmp_path / "m2", options, device="cpu", max_steps_this_run=2)
    copies = [tmp_path / "copy" / p.name for p in two]
    for source, copy in zip(two, copies):
        save_slices(copy, load_slices(source))
    capsys.readouterr()
    assert _state(train_sdm(copies[::-1], tmp_path / "m2", options, device="cpu", max_steps_this_run=0))["step"] == 2
    assert "resumed from" in capsys.readouterr().err


def test_two_stage_recipe_drops_maps_only_in_the_second_stage():
    """The official recipe: stage 1 trains on every map, stage 2 (the last finetune_steps) drops maps at
    drop_rate with finetune_lr; finetune_steps 0 is the demo's single stage, dropping from step 0."""
    rng = np.random.default_rng(0)
    labels = np.stack([chest_map(32) for _ in range(4)])
    data = SlicePairs(np.stack([chest_image(lb, rng) for lb in labels]), labels, 16)
    options = tiny(max_steps=10, finetune_steps=4, drop_rate=0.5, batch_size=16, lr=1e-3, finetune_lr=1e-5)
    kept = [draw_batch(data, options, step)[4] for step in range(options.max_steps)]
    assert all(bool((keep == 1).all()) for keep in kept[:6])  # stage 1: no map dropped
    assert all(bool((keep == 0).any()) for keep in kept[6:])  # stage 2: some dropped in every batch
    assert 0.3 < float(torch.cat(kept[6:]).mean()) < 0.7
    single = options.replace(finetune_steps=0)
    assert all(bool((draw_batch(data, single, step)[4] == 0).any()) for step in range(4))

    trainer = Trainer(data, options.replace(batch_size=2), "cpu")
    rates = []
    for _ in range(options.max_steps):
        trainer.train_step()
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    assert rates == [1e-3] * 6 + [1e-5] * 4

    # The real config's defaults are that recipe, without gradient clipping.
    defaults = SDMOptions()
    assert defaults.grad_clip is None and (defaults.finetune_steps, defaults.finetune_lr, defaults.drop_rate) == \
        (20_000, 2e-5, 0.2)
    schema = yaml.safe_load((Path(__file__).parents[1] / "schemas" / "config.schema.yaml").read_text())
    schema_defaults = {k: v["default"] for k, v in schema["properties"]["sdm"]["properties"].items()}
    assert SDMOptions.from_config(schema_defaults) == defaults
    with pytest.raises(ValueError, match="finetune_steps"):
        tiny(max_steps=3, finetune_steps=4)


def test_resume_across_a_moved_fine_tuning_start(tmp_path, capsys):
    """A longer run moves the start of fine-tuning: a checkpoint past it is not resumed, one before it is."""
    paths = write_chest_stacks(tmp_path / "slices", count=1)
    options = tiny(max_steps=4, finetune_steps=2)
    train_sdm(paths, tmp_path / "m", options, device="cpu", max_steps_this_run=3)  # step 3, in stage 2
    capsys.readouterr()
    train_sdm(paths, tmp_path / "m", options.replace(max_steps=6), device="cpu", max_steps_this_run=0)
    assert "past the start of fine-tuning" in capsys.readouterr().err
    train_sdm(paths, tmp_path / "n", options, device="cpu", max_steps_this_run=1)  # step 1, in stage 1 of both
    assert _state(train_sdm(paths, tmp_path / "n", options.replace(max_steps=6), device="cpu",
                            max_steps_this_run=0))["step"] == 1


def test_train_then_sample_files(tmp_path):
    paths = write_chest_stacks(tmp_path / "slices")
    model_path = train_sdm(paths, tmp_path / "model", tiny(max_steps=3), device="cpu")
    loss = (tmp_path / "model" / "loss.tsv").read_text().splitlines()
    assert loss[0].split("\t") == ["step", "loss", "mse", "vb", "images_per_s"] and len(loss) == 4
    model, diffusion, options = load_sdm(model_path, "cpu")
    assert options == tiny(max_steps=3) and not model.training

    written = sample_sdm(model_path, paths, tmp_path / "synth", fold="0", sampler="ddim", steps=3, seed=7,
                         max_slices_per_scan=4, batch_size=3)
    assert [p.name for p in written] == ["scan0.npz", "scan1.npz"]
    stack = load_slices(written[0])
    source = load_slices(paths[0])
    assert stack.image.shape == stack.label.shape == (4, 16, 16) and stack.image.dtype == np.uint8
    assert stack.scan_id == "scan0" and stack.patient_id == "P0"
    assert np.array_equal(stack.label, source.label[stack.extra["source_index"]][:, ::2, ::2])
    assert np.array_equal(stack.z, source.z[stack.extra["source_index"]])
    # Another batch size regroups the maps across the two scans (3+3+2 vs 5+3): each map's noise is its own, so
    # the images are the same up to float rounding in the network's batched kernels.
    again = sample_sdm(model_path, paths, tmp_path / "synth2", fold="0", sampler="ddim", steps=3, seed=7,
                       max_slices_per_scan=4, batch_size=5)
    for first, second in zip(written, again):
        a, b = load_slices(first).image.astype(int), load_slices(second).image.astype(int)
        assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99
    other_seed = sample_sdm(model_path, paths[:1], tmp_path / "synth3", fold="0", sampler="ddim", steps=3, seed=8,
                            max_slices_per_scan=4, batch_size=3)
    assert np.abs(load_slices(other_seed[0]).image.astype(int) - stack.image).max() > 1

    transplanted = load_slices(sample_sdm(model_path, paths[:1], tmp_path / "tp", fold="0", sampler="dpmpp_2m", steps=2,
                                          mask_source="transplant", seed=1)[0])
    assert len(transplanted) > 0 and transplanted.has_nodule.all()
    assert (source.label[transplanted.extra["source_index"]] != NODULE).all()  # made from nodule-free maps


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_speed_features_train_and_match_fp32(device):
    """bf16 autocast + channels-last + SDPA, forced on where the device is a CPU (they are off there by
    default), so that CI runs the code a GPU runs: training steps run and move every weight, the
    network's output stays close to the plain fp32 one with the same weights, and sampling with the
    features matches fp32 sampling up to bf16 rounding."""
    rng = np.random.default_rng(0)
    labels = np.stack([chest_map(32, (16, 10, 2)) for _ in range(4)])
    data = SlicePairs(np.stack([chest_image(lb, rng) for lb in labels]), labels, 16)
    trainer = Trainer(data, tiny(), device, bf16=True, channels_last=True)
    assert trainer.bf16 and trainer.channels_last
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    losses = torch.stack([trainer.train_step() for _ in range(3)])
    assert torch.isfinite(losses).all() and (losses[:, 0] > 0).all()
    moved = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])]
    assert len(moved) == len(before)  # gradients reach every weight through autocast

    model = randomize(trainer.model, scale=0.05)
    model.options = tiny()
    x, t = torch.randn(4, 1, 16, 16, device=device), torch.tensor([0, 10, 20, 39], device=device)
    cond = one_hot(torch.randint(6, (4, 16, 16), device=device))
    with torch.no_grad():
        with torch.autocast(device, dtype=torch.bfloat16):
            fast = model(x.contiguous(memory_format=torch.channels_last), t,
                         cond.contiguous(memory_format=torch.channels_last))
        assert fast.dtype == torch.bfloat16
        set_attention(model, "plain")
        plain = model(x, t, cond)
    assert torch.allclose(fast.float(), plain, atol=0.05 * plain.abs().max().item())

    set_attention(model, "sdpa")
    maps = torch.from_numpy(np.stack([chest_map(16)] * 2).astype(np.int64))
    images = {on: sample_images(model, trainer.diffusion, maps, "dpmpp_2m", 4, 1.5, torch.Generator().manual_seed(0),
                                bf16=on, channels_last=on) for on in (True, False)}
    assert images[True].shape == (2, 16, 16)
    # Random weights saturate most pixels, so this checks that the bf16 path follows the same
    # trajectory (no NaN, no sign flips), not its fine rounding; the network check above does that.
    assert np.abs(images[True].astype(int) - images[False].astype(int)).mean() < 4  # gray levels


# --- memory: micro-batches, gradient checkpointing, the memory model ---------------------------


def _small_data(count=8, size=32):
    rng = np.random.default_rng(0)
    labels = np.stack([chest_map(size, (size // 2, size // 3, 2) if i % 2 else None) for i in range(count)])
    return SlicePairs(np.stack([chest_image(lb, rng) for lb in labels]), labels, 16)


@pytest.mark.parametrize("micro", [2, 3])
def test_micro_batches_give_the_full_batch_step(micro):
    """One step at batch 8 in passes of `micro` (4 x 2, or 3 + 3 + 2) equals one pass of 8: the same losses,
    gradients and weights, to float rounding; the cut changes nothing a checkpoint depends on."""
    data = _small_data()
    options = tiny(batch_size=8, lr=1e-2, grad_checkpoint=False)
    whole = Trainer(data, options.replace(micro_batch_size=None), "cpu")
    parts = Trainer(data, options.replace(micro_batch_size=micro), "cpu")
    assert whole.options.micro_batches == [8] and sum(parts.options.micro_batches) == 8
    assert len(parts.options.micro_batches) == math.ceil(8 / micro)
    for p in (*whole.model.parameters(), *parts.model.parameters()):  # zero-initialised layers get a gradient too
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    before = {k: v.detach().clone() for k, v in whole.model.named_parameters()}
    assert torch.allclose(whole.train_step(), parts.train_step(), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(whole.model.named_parameters(), parts.model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name
        # Adam's first step moves each weight by lr * sign(gradient): where a gradient is rounding noise (a
        # bias before a group norm), the sign is noise too; elsewhere the weights agree.
        clear = a.grad.abs() > 1e-6
        assert torch.allclose(a[clear], b[clear], rtol=1e-5, atol=1e-6), name
    assert any(not torch.equal(before[k], v) for k, v in whole.model.named_parameters())  # the step moved them
    with pytest.raises(ValueError, match="sdm.micro_batch_size"):
        tiny(micro_batch_size=0)


def test_gradient_checkpointing_keeps_gradients_and_saves_less():
    """Recomputing the residual blocks in backward gives the same gradients and keeps fewer tensors."""
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 30])
    cond = one_hot(torch.randint(6, (2, 16, 16)))
    grads, saved = {}, {}
    for on in (False, True):
        model = randomize(SDMUNet(tiny(grad_checkpoint=on))).train()
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: count.append(s.numel()) or s, lambda s: s):
            model(x, t, cond).square().mean().backward()
        grads[on] = {k: p.grad for k, p in model.named_parameters()}
        saved[on] = sum(count)
    assert all(torch.allclose(grads[True][k], g, rtol=1e-5, atol=1e-7) for k, g in grads[False].items())
    assert saved[True] < saved[False] / 2


def test_resume_after_changing_micro_batches_or_checkpointing(tmp_path):
    """How a step spends memory may change between a kill and its restart: the checkpoint is resumed."""
    paths = write_chest_stacks(tmp_path / "slices", count=1)
    train_sdm(paths, tmp_path / "m", tiny(max_steps=3, micro_batch_size=2), device="cpu", max_steps_this_run=2)
    resumed = train_sdm(paths, tmp_path / "m", tiny(max_steps=3, micro_batch_size=None, grad_checkpoint=False),
                        device="cpu", max_steps_this_run=0)
    assert _state(resumed)["step"] == 2


def test_memory_model_paper_defaults_fit_an_80_gb_gpu():
    """The meta-device count: the paper's network at 256 px in one pass of 32 without checkpointing needs far
    more than 80 GB (the issue's out-of-memory); the schema defaults (checkpointing, passes of 16) fit."""
    from nodulesynth.models.sdm.memory import training_memory

    gib = 2 ** 30
    paper = SDMOptions()
    plain = training_memory(paper.replace(grad_checkpoint=False, micro_batch_size=None))
    assert plain.micro_batch == 32 and 640e6 < plain.parameters < 660e6
    assert 12 * gib < plain.state_bytes < 13 * gib and plain.peak_bytes > 110 * gib
    fits = training_memory(paper)
    assert fits.micro_batch == 16 and fits.peak_bytes < 40 * gib  # half of an H100's 80 GB: room for the rest
    same_pass = training_memory(paper.replace(grad_checkpoint=False), micro_batch=16)
    assert same_pass.activation_bytes > 3 * fits.activation_bytes


def test_memory_model_keeps_group_norms_in_fp32_under_bf16_as_cuda_does():
    """CUDA's autocast runs group norms in fp32, and what follows them up to the next convolution too, while a
    convolution saves the bf16 copy of its input: under bf16 the paper's network keeps about as many bytes for
    backward as in fp32, not half (the CPU's autocast, under which the estimate runs, left group norms in bf16)."""
    from nodulesynth.models.sdm.memory import training_memory

    paper = SDMOptions().replace(grad_checkpoint=False)
    bf16 = training_memory(paper, micro_batch=1, bf16=True).activation_bytes
    fp32 = training_memory(paper, micro_batch=1, bf16=False).activation_bytes
    assert 0.9 * fp32 < bf16 < 1.2 * fp32


def test_memory_model_counts_what_autograd_keeps_on_a_real_pass():
    """Without checkpointing the fake-tensor count equals the bytes a real CPU pass keeps for backward."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from nodulesynth.models.sdm.memory import training_memory

    options = tiny(grad_checkpoint=False, bf16=False)
    model = SDMUNet(options).train()
    weights = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    kept = {}

    def pack(tensor):
        key = StorageWeakRef(tensor.untyped_storage()).cdata
        if key not in weights:
            kept[key] = (tensor.untyped_storage().nbytes(), tensor)  # the tensor: its storage's key stays its own
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        model(torch.randn(3, 1, 16, 16), torch.zeros(3, dtype=torch.long), torch.randn(3, 6, 16, 16))
    estimate = training_memory(options, micro_batch=3)
    assert estimate.activation_bytes == sum(n for n, _ in kept.values())
    assert estimate.state_bytes == 20 * sum(p.numel() for p in model.parameters())
    assert training_memory(options.replace(grad_checkpoint=True), micro_batch=3).activation_bytes < \
        estimate.activation_bytes


# --- transplanted nodules ----------------------------------------------------------------------


def test_transplant_places_nodule_inside_one_lung():
    source = chest_map(64, (32, 19, 3))
    shapes = nodule_shapes(source)
    assert len(shapes) == 1 and shapes[0].sum() == (source == NODULE).sum()
    free = chest_map(64)
    for seed in range(20):
        out = transplant_nodule(free, shapes, np.random.default_rng(seed))
        nodule = out == NODULE
        assert nodule.sum() == shapes[0].sum()
        assert np.array_equal(out[~nodule], free[~nodule])  # nothing else changes
        ring = ndimage.binary_dilation(nodule, structure=np.ones((3, 3), bool)) & ~nodule
        lung = np.unique(free[ring])
        assert len(lung) == 1 and lung[0] in (LEFT_LUNG, RIGHT_LUNG)  # only one lung around it
        assert np.unique(free[nodule]).tolist() == lung.tolist()
    same = [transplant_nodule(free, shapes, np.random.default_rng(3)) for _ in range(2)]
    assert np.array_equal(*same)
    # Lungs too small for the nodule: no placement.
    tiny_lungs = np.where(np.isin(free, (LEFT_LUNG, RIGHT_LUNG)), BODY, free).astype(np.uint8)
    tiny_lungs[10:13, 10:13] = LEFT_LUNG
    assert transplant_nodule(tiny_lungs, shapes, np.random.default_rng(0)) is None


def test_choose_maps():
    labels = np.stack([chest_map(32, (16, 10, 2) if i in (1, 4) else None) for i in range(8)])
    idx, maps = choose_maps(labels, "real", np.random.default_rng(0), max_slices=3)
    assert idx.tolist() == [0, 4, 7] and np.array_equal(maps, labels[idx])
    shapes = nodule_shapes(labels)
    idx, maps = choose_maps(labels, "transplant", np.random.default_rng(0), shapes)
    assert idx.tolist() == [0, 2, 3, 5, 6, 7] and all((m == NODULE).any() for m in maps)
    # Maps without room for a nodule (no lung: 0, 2, 7) are replaced by others.
    lungless = labels.copy()
    lungless[[0, 2, 7]] = np.where(np.isin(labels[[0, 2, 7]], (LEFT_LUNG, RIGHT_LUNG)), BODY, labels[[0, 2, 7]])
    idx, maps = choose_maps(lungless, "transplant", np.random.default_rng(0), shapes, max_slices=3)
    assert idx.tolist() == [3, 5, 6] and len(maps) == 3
    with pytest.raises(ValueError, match="mask_source must be 'real' or 'transplant', got 'imagined'"):
        choose_maps(labels, "imagined", np.random.default_rng(0))
