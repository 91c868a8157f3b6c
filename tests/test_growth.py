"""Growth ops (lilt.growth): function preservation, momentum inheritance, training, checkpoints, errors, budget."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import clip_loss, sample_batch

import lilt
from lilt.growth import (OP_GRAMMAR, GrowthOp, Inheritance, TokenBlock, add_shared_encoder, grow, grow_,
                         grow_depth, grow_width)

# deep first (later rules see its blocks), LoRA kept off the appended blocks so width:blocks can widen them.
RULES = [{"tower": "both", "method": "deep"},
         {"tower": "both", "method": "adapter"},
         {"tower": "both", "method": "lora", "layers": "bottom:2", "options": {"r": 4}},
         {"tower": "both", "method": "layernorm"}]
# Which parameter names a width op may widen, per target (independent of lilt's code).
WIDENS = {"adapter": r".lilt_adapter.", "lora": r".lora_", "blocks": r"_blocks.", "shared": r"shared_encoder.",
          "heads": r"_proj."}


# -- helpers -------------------------------------------------------------------------------------------
def _perturb(model, seed: int = 0, names=None) -> None:
    """Move trainable parameters off their initial values, so zero-initialized parts hide no bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (names is None or name in names):
                p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.dtype))


def _ready(make_model, vision: str = "vit", prep=(), rules=RULES, perturb: bool = True):
    """A tiny model with a plan applied, grown in place by `prep`, trainable tensors perturbed."""
    model = make_model(vision)
    lilt.apply_plan(model, lilt.TuningPlan(rules, name="growth-test"))
    for op in prep:
        grow_(model, op)
    if perturb:
        _perturb(model)
    return model


def _raw(model, images, text) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalized image and text embeddings in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.encode_image(images, normalize=False), model.encode_text(text, normalize=False)
    model.train(was_training)
    return out


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _block_counts(model) -> dict[str, int]:
    counts = {}
    for name in ("vision", "text"):
        tower = getattr(model, name)
        counts[f"{name}:top"] = len(tower.extra_blocks)
        counts[f"{name}:interleave"] = sum(len(blocks) for blocks in tower.inserted_blocks.values())
    counts["shared"] = len(model.shared_encoder.blocks) if model.shared_encoder is not None else 0
    return counts


def _new_slice(tensor: torch.Tensor, widening) -> torch.Tensor:
    return tensor.narrow(widening.dim, widening.old_size, tensor.shape[widening.dim] - widening.old_size)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- 1. function preservation, for every op -----------------------------------------------------------
OPS = ["depth:vision:1", "depth:vision:2:interleave", "depth:text:1", "depth:text:2:interleave",
       "width:adapter:2", "width:adapter:1.5:text", "width:lora:2", "width:lora:3:vision", "width:blocks:2",
       "width:heads:2", "shared:1:32"]
PREPPED = [(("shared:1:32",), "depth:shared:1"), (("shared:1:32",), "width:shared:2"),
           (("shared:2:32", "depth:shared:1", "width:shared:2"), "width:shared:1.5"),
           (("depth:vision:1:interleave", "depth:text:1:interleave"), "width:blocks:2")]
CNN_ONLY = [((), "depth:vision:1:transformer"), ((), "depth:vision:2:interleave:transformer"),
            (("depth:vision:1:transformer", "depth:vision:1:interleave:transformer"), "width:blocks:2:vision")]


def _case_id(vision: str, prep, op: str) -> str:
    return "-".join([vision, *(f"after[{p}]" for p in prep), op])


PRESERVE = [pytest.param(vision, prep, op, id=_case_id(vision, prep, op))
            for vision in ("vit", "cnn")
            for prep, op in [*(((), op) for op in OPS), *PREPPED, *(CNN_ONLY if vision == "cnn" else [])]]


@pytest.mark.parametrize("vision,prep,op", PRESERVE)
def test_growth_preserves_the_function_and_leaves_the_original_alone(make_model, vision, prep, op):
    model = _ready(make_model, vision, prep)
    images, text = sample_batch(model)
    before_out = _raw(model, images, text)
    before_shapes = _shapes(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_counts, before_history = _block_counts(model), list(model.growth)
    before_grown = dict(model.plan_state.grown)
    embed_dim = model.config.embed_dim

    result = grow(model, op)
    grown, parsed = result.model, GrowthOp.parse(op)
    assert grown is not model
    assert result.op.spec() == parsed.spec()

    # Same function: every old embedding dimension to 1e-5, new embedding dimensions exactly 0.
    after_out = _raw(grown, images, text)
    for before, after in zip(before_out, after_out):
        if parsed.target == "heads":
            assert after.shape == (before.shape[0], 2 * before.shape[1])
            assert torch.count_nonzero(after[:, before.shape[1]:]) == 0, "new embedding dimensions start at 0"
            after = after[:, :before.shape[1]]
        assert after.shape == before.shape
        assert _max_diff(before, after) < 1e-5

    # It really grew: more parameters; added (depth, shared) or widened (width) tensors as the op says.
    assert _numel(grown) > _numel(model)
    shapes = _shapes(grown)
    assert set(result.names) == set(before_shapes) and all(k == v for k, v in result.names.items())
    counts = _block_counts(grown)
    if parsed.kind == "width":
        assert result.widened and not result.added
        assert counts == before_counts
        for name, widening in result.widened.items():
            assert WIDENS[parsed.target] in name, name
            if parsed.tower != "both":
                assert name.startswith(parsed.tower + "."), name
            assert before_shapes[name][widening.dim] == widening.old_size
            assert shapes[name][widening.dim] == len(widening.source) > widening.old_size
        if parsed.target == "heads":
            assert grown.config.embed_dim == 2 * embed_dim
    else:
        assert result.added and not result.widened
        assert all(n in shapes and n not in before_shapes for n in result.added)
        assert set(shapes) - set(before_shapes) == set(result.added)
        key = "shared" if parsed.kind == "shared" or parsed.target == "shared" else f"{parsed.target}:{parsed.where}"
        expected = dict(before_counts, **{key: before_counts[key] + int(parsed.amount)})
        assert counts == expected
        if parsed.block == "transformer":
            tower = grown.vision
            new = list(tower.extra_blocks) if parsed.where == "top" else \
                [b for blocks in tower.inserted_blocks.values() for b in blocks]
            assert sum(isinstance(b, TokenBlock) for b in new) == int(parsed.amount)
        assert set(grown.plan_state.grown) == set(before_grown) | set(result.added)
    assert grown.growth == [*before_history, grown.growth[-1]] and grown.growth[-1]["op"] == parsed.spec()

    # grow is a pure function: the original keeps its parameters, values, history and outputs.
    assert _shapes(model) == before_shapes
    state = model.state_dict()
    assert set(state) == set(before_state)
    assert all(torch.equal(state[k], v) for k, v in before_state.items())
    assert model.growth == before_history and model.plan_state.grown == before_grown
    assert model.config.embed_dim == embed_dim
    assert _block_counts(model) == before_counts
    for before, again in zip(before_out, _raw(model, images, text)):
        assert torch.equal(before, again)


def test_grow_shares_frozen_tensors_and_copies_trainable_ones(make_model):
    model = _ready(make_model, "vit")
    grown = grow(model, "depth:text:1").model
    params = dict(grown.named_parameters())
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert frozen and trainable
    assert all(params[n] is p for n, p in frozen), "frozen backbone tensors are shared, not copied"
    assert all(params[n].data_ptr() != p.data_ptr() for n, p in trainable), "trainable tensors are copies"


def test_grow_in_place_and_the_helpers_match_the_op_specs(make_model):
    model = _ready(make_model, "vit")
    images, text = sample_batch(model)
    before = _raw(model, images, text)
    numel = _numel(model)
    result = grow_(model, "depth:vision:1:interleave")
    assert result.model is model and result.added and _numel(model) > numel
    assert [r["op"] for r in model.growth] == ["depth:vision:1:interleave"]
    assert all(_max_diff(b, a) < 1e-5 for b, a in zip(before, _raw(model, images, text)))

    helpers = [(lambda: grow_depth(model, "vision", 2, "interleave"), "depth:vision:2:interleave"),
               (lambda: grow_depth(model, "text", 1), "depth:text:1"),
               (lambda: grow_width(model, "adapter", 2, tower="text"), "width:adapter:2:text"),
               (lambda: grow_width(model, "heads", 2), "width:heads:2"),
               (lambda: add_shared_encoder(model, 2, 32), "shared:2:32")]
    for helper, spec in helpers:
        torch.manual_seed(5)
        a = helper()
        torch.manual_seed(5)
        b = grow(model, spec)
        assert a.op.spec() == spec and a.model.growth[-1]["op"] == spec
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), spec
        assert a.added == b.added and set(a.widened) == set(b.widened)


def test_widened_lora_keeps_rank_alpha_and_scaling_consistent(make_model):
    """peft scales by alpha / r: a widened rank must raise alpha with it and keep the scaling."""
    from peft.tuners.lora import LoraLayer

    model = _ready(make_model, "vit")
    before = {n: {k: (m.r[k], m.scaling[k]) for k in m.lora_A} for n, m in model.named_modules()
              if isinstance(m, LoraLayer)}
    grown = grow(model, "width:lora:2").model
    checked = 0
    for name, module in grown.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for key in module.lora_A:
            r, scaling = before[name][key]
            assert module.r[key] == 2 * r == module.lora_A[key].weight.shape[0] == module.lora_B[key].weight.shape[1]
            assert module.scaling[key] == pytest.approx(scaling)
            assert module.lora_alpha[key] / module.r[key] == pytest.approx(scaling)
            checked += 1
    assert checked


# -- 2. momentum inheritance --------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["depth:text:1", "depth:vision:1:interleave", "width:adapter:2", "width:lora:2",
                                "shared:1:32"])
def test_momentum_below_one_moves_the_function(make_model, op):
    model = _ready(make_model, "vit")
    images, text = sample_batch(model)
    before = _raw(model, images, text)
    result = grow(model, op, Inheritance(momentum=0.5))
    after = _raw(result.model, images, text)
    assert max(_max_diff(b, a) for b, a in zip(before, after)) > 1e-3
    assert result.model.growth[-1]["momentum"] == 0.5
    kept = _raw(grow(model, op, Inheritance(momentum=1.0)).model, images, text)
    assert max(_max_diff(b, a) for b, a in zip(before, kept)) < 1e-5


MIX_CASES = [("vit", (), "depth:text:1"), ("vit", (), "depth:vision:1"), ("vit", (), "depth:vision:2:interleave"),
             ("cnn", (), "depth:vision:1"), ("cnn", (), "depth:vision:1:transformer"), ("vit", (), "shared:1:32"),
             ("vit", ("shared:1:32",), "depth:shared:1"), ("vit", (), "width:adapter:2"), ("vit", (), "width:lora:2"),
             ("cnn", (), "width:blocks:2"), ("vit", (), "width:heads:2"), ("vit", ("shared:1:32",), "width:shared:2")]


@pytest.mark.parametrize("vision,prep,op", [pytest.param(*c, id=_case_id(*c)) for c in MIX_CASES])
def test_momentum_mixes_inherited_and_fresh_values(make_model, vision, prep, op):
    """new = m * inherited + (1 - m) * fresh, with m = 1 the inherited and m = 0 the fresh value (same seed)."""
    model = _ready(make_model, vision, prep)
    results = {}
    for m in (0.0, 0.5, 1.0):
        torch.manual_seed(11)
        results[m] = grow(model, op, Inheritance(momentum=m))
    params = {m: dict(r.model.named_parameters()) for m, r in results.items()}
    assert set(params[0.0]) == set(params[0.5]) == set(params[1.0])
    ref = results[1.0]
    assert results[0.0].added == results[0.5].added == ref.added
    pairs = [(params[0.0][n].detach(), params[0.5][n].detach(), params[1.0][n].detach()) for n in ref.added]
    for name, widening in ref.widened.items():
        tensors = [params[m][name].detach() for m in (0.0, 0.5, 1.0)]
        old = [t.narrow(widening.dim, 0, widening.old_size) for t in tensors]
        assert torch.equal(old[0], old[1]) and torch.equal(old[1], old[2]), f"old units of {name} do not mix"
        pairs.append(tuple(_new_slice(t, widening) for t in tensors))
    assert pairs
    for fresh, mixed, inherited in pairs:
        assert torch.allclose(mixed, 0.5 * inherited + 0.5 * fresh, atol=1e-6)
    assert any(not torch.allclose(fresh, inherited) for fresh, _, inherited in pairs), "fresh differs somewhere"


def test_momentum_on_widened_heads_scales_the_new_rows(make_model):
    model = _ready(make_model, "vit")
    images, text = sample_batch(model)
    before = _raw(model, images, text)
    old = model.config.embed_dim
    results = {}
    for m in (0.0, 0.5, 1.0):
        torch.manual_seed(7)
        results[m] = grow(model, "width:heads:2", Inheritance(momentum=m))
    for head in ("vision_proj", "text_proj"):
        original = getattr(model, head)
        for pname in ("weight", "bias"):
            value = {m: getattr(getattr(r.model, head), pname).detach() for m, r in results.items()}
            assert value[1.0].shape[0] == 2 * old
            assert torch.count_nonzero(value[1.0][old:]) == 0, "m = 1: new rows are zero"
            assert value[0.0][old:].abs().max() > 0, "m = 0: new rows are a fresh initialization"
            assert torch.allclose(value[0.5][old:], 0.5 * value[0.0][old:], atol=1e-7)
            for m in value:
                assert torch.equal(value[m][:old], getattr(original, pname).detach()), "old rows are kept"
    after = _raw(results[0.5].model, images, text)
    for b, a in zip(before, after):
        assert _max_diff(b, a[:, :old]) < 1e-5
        assert a[:, old:].abs().max() > 1e-3, "m < 1: the new embedding dimensions are not zero"


@pytest.mark.parametrize("momentum", [-0.1, 1.5, 2.0])
def test_momentum_outside_the_unit_interval_raises(momentum):
    with pytest.raises(lilt.ConfigError, match=r"momentum .* must be in \[0, 1\]"):
        Inheritance(momentum=momentum)
    with pytest.raises(lilt.ConfigError, match="momentum"):
        Inheritance.from_dict({"momentum": momentum})


def test_unknown_width_init_raises():
    with pytest.raises(lilt.ConfigError, match="width_init"):
        Inheritance(width_init="random")


# -- 3. grown parameters train ------------------------------------------------------------------------
TRAIN_CASES = [("vit", "depth:text:1", "split"), ("vit", "depth:vision:1:interleave", "split"),
               ("cnn", "depth:vision:1", "split"), ("cnn", "depth:vision:1:interleave:transformer", "split"),
               ("vit", "shared:1:32", "split"), ("vit", "width:adapter:2", "zero"), ("vit", "width:adapter:2", "split"),
               ("cnn", "width:adapter:2", "zero"), ("cnn", "width:adapter:2", "split"), ("vit", "width:lora:2", "zero")]


def _grads(model, images, text) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model.train()
    clip_loss(model, images, text).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _softmax_invariant(name: str) -> bool:
    # Attention logits do not depend on the key bias (softmax is shift-invariant): its gradient is ~0.
    return name.endswith("key.bias")


@pytest.mark.parametrize("vision,op,width_init", [pytest.param(*c, id="-".join(c)) for c in TRAIN_CASES])
def test_grown_parameters_receive_gradients(make_model, vision, op, width_init):
    model = _ready(make_model, vision)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    result = grow(model, op, Inheritance(width_init=width_init))
    grown = result.model
    targets = [*result.added, *result.widened]
    assert targets
    params = dict(grown.named_parameters())
    assert all(params[n].requires_grad for n in targets), "grown parameters train"
    assert {n for n, p in params.items() if not p.requires_grad} == frozen, "the backbone stays frozen"
    images, text = sample_batch(grown)

    # As grown (zero-initialized outputs): every grown tensor is in the graph, the output side moves first.
    grads = _grads(grown, images, text)
    assert all(grads[n] is not None for n in targets), [n for n in targets if grads[n] is None]
    assert all(grads[n] is None for n in frozen), "frozen parameters get no gradient"
    if result.added:
        assert any(grads[n].abs().sum() > 0 for n in result.added)
    for name, widening in result.widened.items():
        if widening.dim == 1 or width_init == "split":  # zero init: new inputs see no gradient until step 1
            assert _new_slice(grads[name], widening).abs().sum() > 0, f"new units of {name} get no gradient"

    # Once the new values are off zero, every one of them gets a gradient.
    _perturb(grown, seed=1, names=set(targets))
    grads = _grads(grown, images, text)
    for name in result.added:
        if not _softmax_invariant(name):
            assert grads[name].abs().sum() > 0, f"{name} gets no gradient"
    for name, widening in result.widened.items():
        assert _new_slice(grads[name], widening).abs().sum() > 0, f"new units of {name} get no gradient"
    assert all(grads[n] is None for n in frozen)


def test_units_inserted_above_a_frozen_block_still_train(make_model):
    """Only the top ViT block trains, so block 0 is a frozen prefix; a block inserted after it must train."""
    model = _ready(make_model, "vit", rules=[{"tower": "vision", "method": "layernorm", "layers": "top:1"}])
    assert model.vision.frozen_prefix_depth() == 1
    result = grow(model, "depth:vision:1:interleave")
    grown = result.model
    assert grown.vision.frozen_prefix_depth() == 1, "the inserted block runs with autograd"
    images, text = sample_batch(grown)
    _perturb(grown, seed=1, names=set(result.added))
    grads = _grads(grown, images, text)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in result.added)


# -- 4. checkpoints -----------------------------------------------------------------------------------
CHAINS = {
    "chain": [("depth:text:1", 1.0), ("width:adapter:2", 1.0), ("width:heads:2", 1.0), ("shared:1:32", 1.0),
              ("depth:vision:1:interleave", 1.0)],
    "chain-momentum": [("depth:vision:1", 0.5), ("width:blocks:2", 0.5), ("shared:2:32", 0.3),
                       ("width:shared:2", 1.0), ("width:lora:2:text", 1.0)],
    "heads-twice": [("width:heads:2", 1.0), ("depth:text:1", 1.0), ("width:heads:2", 1.0)],
}


@pytest.mark.parametrize("vision,chain", [pytest.param(v, c, id=f"{v}-{c}") for v in ("vit", "cnn") for c in CHAINS])
def test_checkpoint_round_trip_of_a_grown_model(make_model, tmp_path, vision, chain):
    model = _ready(make_model, vision)
    for op, momentum in CHAINS[chain]:
        model = grow(model, op, Inheritance(momentum=momentum)).model
    _perturb(model, seed=2)
    images, text = sample_batch(model)
    model.train()
    model(images, **text)  # a train-mode forward: BatchNorm statistics of grown CNN blocks move
    expected = _raw(model, images, text)
    model.save_pretrained(tmp_path / "ckpt")

    manifest = json.loads((tmp_path / "ckpt" / "lilt_config.json").read_text())
    assert isinstance(manifest["growth"], list)
    assert [r["op"] for r in manifest["growth"]] == [GrowthOp.parse(op).spec() for op, _ in CHAINS[chain]]
    assert manifest["growth"] == model.growth

    loaded = lilt.DualEncoder.from_pretrained(tmp_path / "ckpt")
    assert loaded.growth == model.growth
    assert _shapes(loaded) == _shapes(model)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    for e, got in zip(expected, _raw(loaded, images, text)):
        assert e.shape == got.shape
        assert _max_diff(e, got) < 1e-6
    assert lilt.budget(loaded).by_rule == lilt.budget(model).by_rule


# -- 5. errors and the op grammar -----------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["depth:text", "width:heads:1", "depth:foo:1", "bogus", "depth:text:0",
                                  "depth:text:1.5", "depth:text:1:sideways", "width:adapter:x", "width:bar:2",
                                  "shared:1", "shared:1:0", "width:adapter:2:both:x", ""])
def test_bad_op_specs_raise_with_the_grammar(spec):
    with pytest.raises(lilt.ConfigError) as info:
        GrowthOp.parse(spec)
    assert OP_GRAMMAR in str(info.value)


@pytest.mark.parametrize("spec", ["depth:text:1", "depth:vision:2:interleave", "depth:vision:1:transformer",
                                  "depth:vision:3:interleave:transformer", "depth:shared:2", "width:adapter:2",
                                  "width:lora:1.5:vision", "width:blocks:3:text", "width:heads:2", "width:shared:2",
                                  "shared:2:64"])
def test_op_specs_round_trip(spec):
    op = GrowthOp.parse(spec)
    assert op.spec() == spec
    assert GrowthOp.parse(op.to_dict()).spec() == spec
    assert GrowthOp.parse(op) is op


def test_op_parse_reads_the_fields():
    op = GrowthOp.parse("depth:vision:3:interleave:transformer")
    assert (op.kind, op.target, op.amount, op.where, op.block) == ("depth", "vision", 3, "interleave", "transformer")
    op = GrowthOp.parse("width:lora:1.5:text")
    assert (op.kind, op.target, op.amount, op.tower) == ("width", "lora", 1.5, "text")
    op = GrowthOp.parse("shared:2:64")
    assert (op.kind, op.amount, op.width) == ("shared", 2, 64)
    assert GrowthOp.parse("depth:text:1:top").spec() == "depth:text:1"


@pytest.mark.parametrize("rules,prep,op,match", [
    pytest.param([{"tower": "both", "method": "adapter"}], (), "width:lora:2", "no lora rule", id="lora-without-rule"),
    pytest.param([{"tower": "both", "method": "lora"}], (), "width:adapter:2", "no adapter rule",
                 id="adapter-without-rule"),
    pytest.param([{"tower": "both", "method": "adapter"}], (), "width:blocks:2", "grow depth first",
                 id="blocks-without-blocks"),
    pytest.param(RULES, (), "depth:shared:1", "needs a shared encoder", id="depth-shared-first"),
    pytest.param(RULES, (), "width:shared:2", "needs a shared encoder", id="width-shared-first"),
    pytest.param(RULES, ("shared:1:32",), "shared:1:32", "already has a shared encoder", id="shared-twice"),
    pytest.param(RULES, (), "depth:vision:1:transformer", "CNN towers", id="transformer-on-vit"),
])
def test_impossible_ops_raise_and_leave_the_model_alone(make_model, rules, prep, op, match):
    model = _ready(make_model, "vit", prep, rules=rules)
    shapes, history = _shapes(model), list(model.growth)
    with pytest.raises(lilt.ConfigError, match=match):
        grow(model, op)
    with pytest.raises(lilt.ConfigError, match=match):
        grow_(model, op)
    assert _shapes(model) == shapes and model.growth == history


# -- 6. the budget -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ops", [["depth:text:1"], ["depth:vision:2:interleave"], ["shared:1:32"],
                                 ["depth:text:1", "width:adapter:2", "shared:1:32", "depth:shared:1",
                                  "width:heads:2", "depth:vision:1:interleave"]],
                         ids=lambda ops: "+".join(ops))
def test_budget_attributes_added_parameters_to_growth(make_model, ops):
    model = _ready(make_model, "vit")
    original = lilt.budget(model)
    assert original.by_method.get("growth", {"trainable": 0})["trainable"] == 0
    grown, added = model, []
    for op in ops:
        result = grow(grown, op)
        grown = result.model
        params = dict(grown.named_parameters())
        added.append(sum(params[n].numel() for n in result.added))
    report = lilt.budget(grown)
    assert report.by_method["growth"]["trainable"] == sum(added)
    rows = [r for r in report.by_rule if r["method"] == "growth"]
    assert [r["trainable"] for r in rows] == added
    assert [r["label"] for r in rows] == [f"growth {i + 1} ({GrowthOp.parse(op).spec()})" for i, op in enumerate(ops)]
    assert report.trainable == sum(p.numel() for p in grown.parameters() if p.requires_grad)
    assert sum(r["trainable"] for r in report.by_rule) == report.trainable
    assert lilt.budget(model).to_dict() == original.to_dict(), "growing a copy leaves the original's budget"


def test_budget_counts_widened_parameters_under_their_rule(make_model):
    model = _ready(make_model, "vit")
    before = lilt.budget(model)
    result = grow(model, "width:adapter:2")
    after = lilt.budget(result.model)
    params = dict(result.model.named_parameters())
    old = dict(model.named_parameters())
    extra = sum(params[n].numel() - old[n].numel() for n in result.widened)
    assert extra > 0
    assert after.by_method["adapter"]["trainable"] == before.by_method["adapter"]["trainable"] + extra
    assert after.by_method["growth"]["trainable"] == 0
    assert after.trainable == before.trainable + extra
