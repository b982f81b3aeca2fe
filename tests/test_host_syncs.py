"""No host reads in a training step or a sampling call, and one graph per training loss.

A host read (``.item()``, ``bool(t)``, a boolean index, ``nonzero``) stalls a GPU step
until the kernel queue drains and breaks a ``torch.compile`` graph. Every model of the
model CASES (tests/model_cases.py) trains and samples without one after its first step
(ActNorm's data-dependent initialization is a one-time event), and dynamo traces its
training loss as one graph (``explain`` traces without compiling, so this is cheap).
benchmarks/host_syncs.py gives the same figures at the shipped configs' sizes."""
from __future__ import annotations

import pytest
import torch

from benchmarks.host_syncs import HostReadCounter, build_module, graph_breaks, random_batch, training_step_reads
from flows.quantization import dequantize
from tests.model_cases import CASES

SINGLE = sorted(name for name in CASES if not name.startswith("cascade"))  # a cascade takes a pyramid


def built(name):
    factory, _ = CASES[name]
    torch.manual_seed(0)
    model, x, cond = factory(3)
    clean = dequantize(((x + 0.5) * 255).round().clamp(0, 255).to(torch.uint8), 5, noise=False)
    return model.train(), clean, cond


def loss_and_backward(model, clean, cond):
    model.training_loss(clean, cond, n_bits=5).loss.backward()


@pytest.mark.parametrize("name", SINGLE)
def test_a_training_step_reads_nothing_back_to_the_host(name):
    model, clean, cond = built(name)
    loss_and_backward(model, clean, cond)  # the first step: data-dependent initializations
    counter = HostReadCounter()
    with counter:
        loss_and_backward(model, clean, cond)
    assert counter.total == 0, dict(counter.where)


@pytest.mark.parametrize("name", SINGLE)
def test_a_sampling_call_reads_nothing_back_to_the_host(name):
    model, clean, cond = built(name)
    loss_and_backward(model, clean, cond)
    model.eval()
    with torch.no_grad():  # cond: the labels, and an SR stage's low-resolution image
        model.sample(3, cond, temperature=0.8)
        counter = HostReadCounter()
        with counter:
            model.sample(3, cond, temperature=0.8)
    assert counter.total == 0, dict(counter.where)


# One model per family (and the class-conditional and learned-dequantizer variants):
# dynamo's tracing costs a few seconds each.
TRACED = ["glow_class_conditional", "glow_variational_dequantization", "realnvp", "tarflow_class_conditional",
          "srflow", "hierarchical", "diffusion_flow", "pixel_diffusion"]


@pytest.mark.slow  # dynamo's tracing: ~40 s for the list on 2 cores; CI runs the slow tests
@pytest.mark.parametrize("name", TRACED)
def test_the_training_loss_traces_as_one_graph(name):
    import torch._dynamo

    model, clean, cond = built(name)
    loss_and_backward(model, clean, cond)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda c: model.training_loss(c, cond, n_bits=5).loss)(clean)
    assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_count == 1


# TarFlow's (a sequential loop of patch steps, the case the static-shape cache exists for)
# run in the fast suite; dynamo's tracing of the others is slow-marked.
COMPILED_SAMPLERS = [name if name.startswith("tarflow") else pytest.param(name, marks=pytest.mark.slow)
                     for name in SINGLE]


@pytest.mark.parametrize("name", COMPILED_SAMPLERS)
def test_a_compiled_sampler_draws_the_eager_samples_from_one_graph(name):
    """``compile_sampler`` (FlowModel; TarFlow's patch step, a diffusion prior's denoiser
    step) gives the eager sampler's samples from the same seed, traced as one graph that
    two calls reuse: a recompilation per patch, per block or per call would show as more
    graphs (dynamo's eager backend: the tracing, not inductor's code generation)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, clean, cond = built(name)
    loss_and_backward(model, clean, cond)
    model.eval()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        torch.manual_seed(1)
        eager = model.sample(3, cond, temperature=0.8)
        model.compile_sampler(backend="eager")
        compiled = []
        for _ in range(2):
            torch.manual_seed(1)
            compiled.append(model.sample(3, cond, temperature=0.8))
    assert all(torch.allclose(sample, eager, atol=1e-5) for sample in compiled)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.slow
def test_the_variational_cascade_step_reads_nothing_and_traces_as_one_graph(tmp_path):
    """The cascade at the module level, where its variational training (noise on the
    previous stage's latent, failed reconstructions replaced) runs."""
    module = build_module("quick_cascade.yaml", tmp_path)
    for resolution in module.model.resolutions[1:]:  # seed 000's variational training on
        module.stage_settings[resolution].sigma = 0.5
    assert all(module.sigma(r) == 0.5 for r in module.model.resolutions[1:])
    batch = random_batch(module)
    assert training_step_reads(module, batch).total == 0
    graphs, breaks, reasons = graph_breaks(module, batch)
    assert (graphs, breaks) == (1, 0), reasons


def test_actnorm_initializes_once_and_not_again_after_a_checkpoint_load():
    from flows.actnorm import ActNorm

    layer = ActNorm(4).train()
    x = torch.randn(8, 4, 3, 3) * 3 + 1
    layer(x)
    y, _ = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    initialized = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(x * 10)  # a later batch does not re-initialize
    assert torch.equal(layer.bias, initialized["bias"])
    fresh = ActNorm(4).train()
    fresh.load_state_dict(initialized)  # a resumed run: the flag comes from the checkpoint
    fresh(x * 10)
    assert torch.equal(fresh.bias, initialized["bias"]) and torch.equal(fresh.log_scale, initialized["log_scale"])
    loaded_uninitialized = ActNorm(4).train()
    loaded_uninitialized.load_state_dict(ActNorm(4).state_dict())  # saved before any step: initializes
    loaded_uninitialized(x)
    assert not torch.equal(loaded_uninitialized.bias, torch.zeros_like(loaded_uninitialized.bias))


def test_the_vectorized_importance_history_equals_the_sequential_one():
    """The importance sampler's history, updated on the device for a whole batch, equals
    appending the values one by one (repeated steps, more draws of one step than the
    history holds), and saves in the sequential layout (oldest first)."""
    from flows.timestep_sampling import TimestepSampler

    width, steps = 3, 6
    sampler = TimestepSampler(steps, "importance", history=width)
    sequential = {t: [] for t in range(steps)}
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        t = torch.randint(1, steps, (8,), generator=generator)
        t[:5] = 2  # five draws of one step in one batch, more than the history holds
        values = torch.rand(8, generator=generator, dtype=torch.float64)
        sampler.update(t, values)
        for step, value in zip(t.tolist(), values.tolist()):
            sequential[step].append(value)
    state = sampler.state()
    for step, values in sequential.items():
        assert int(state["counts"][step]) == len(values)
        kept = values[-width:]
        assert torch.allclose(state["history"][step, :len(kept)], torch.tensor(kept, dtype=torch.float64)), step
    restored = TimestepSampler(steps, "importance", history=width)
    restored.load_state(state)
    assert torch.equal(restored.history, sampler.history) and torch.equal(restored.probabilities(),
                                                                          sampler.probabilities())
