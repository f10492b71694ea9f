"""PEFT as an independent oracle (needs the ``oracle`` extra; skipped cleanly without it).

- Pre-launch, LoRA-Dash *is* LoRA: with the same A and B, PEFT's LoRA gives the same outputs and the
  same gradients for A and B, step after step (float32, dropout 0): max abs difference <= 1e-6.
- After launch, the rank-(r + s) export (METHOD.md §5) written by ``save_peft_adapter`` and loaded by
  ``PeftModel.from_pretrained`` reproduces the LoRA-Dash model (<= 1e-5 relative), for ``nn.Linear``
  and GPT-2 ``Conv1D`` layers, and merging it with PEFT gives LoRA-Dash's own merged weights.
- A tiny BERT classifier adapted with list targets (``["query", "value"]``, PEFT's habit) and a freshly
  initialised head trained in full (``modules_to_save``): PEFT serves exactly the trained classifier.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")
pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

from lora_dash import adapter_parameters, dash_layers, inject, trained_modules  # noqa: E402
from lora_dash.export import export_lora, pad_rank, save_peft_adapter  # noqa: E402

from helpers import train  # noqa: E402
from oracle_helpers import load_into_peft, peft_lora_layers, relative_error  # noqa: E402

R, ALPHA, S, T = 3, 5.0, 3, 5  # α/r and α/√r are not powers of two: scaling B' really rounds
ABSOLUTE = 1e-6  # pre-launch parity
RELATIVE = 1e-5  # export parity, relative to the output's largest entry
TARGETS = {"linear": ["fc", "head"], "conv1d": ["proj"], "mixed": ["fc", "proj", "head"]}
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set")  # PEFT's note on mixed layouts


class Mixed(nn.Module):
    """``nn.Linear`` → GPT-2 ``Conv1D`` (weight stored ``(in, out)``) → ``nn.Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.proj = pytorch_utils.Conv1D(nf=20, nx=16)
        nn.init.normal_(self.proj.weight, std=0.3)
        self.head = nn.Linear(20, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.gelu(self.proj(F.gelu(self.fc(x)))))


def base_model() -> Mixed:
    torch.manual_seed(0)
    return Mixed()


def data(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 12, generator=generator), torch.randn(16, 10, generator=generator)


def dash_model(targets: list[str], **kwargs) -> Mixed:
    model = base_model()
    torch.manual_seed(1)
    inject(model, "|".join(targets), **{"r": R, "alpha": ALPHA, "s": S, **kwargs})
    return model


def mse_on_data(model: nn.Module, step: int, micro: int) -> Tensor:
    x, y = data(step)
    return F.mse_loss(model(x), y)


def trained(model: nn.Module, steps: int) -> nn.Module:
    """``steps`` AdamW steps; the launch comes right after step ``T``."""
    train(model, steps, launch_step=T, loss=mse_on_data)
    return model


# ------------------------------------------------------------------- pre-launch: LoRA-Dash is LoRA
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_pre_launch_outputs_and_A_B_gradients_equal_peft_lora_step_by_step(use_rslora):
    dash = dash_model(TARGETS["mixed"], use_rslora=use_rslora)
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS["mixed"], lora_dropout=0.0, use_rslora=use_rslora
    )
    oracle = peft.get_peft_model(base_model(), config)
    layers, oracle_layers = dash_layers(dash), peft_lora_layers(oracle)
    assert layers.keys() == oracle_layers.keys()
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_B.normal_(std=0.1)  # as after some training; B = 0 would leave A's gradient zero
            oracle_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            oracle_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
            assert oracle_layers[name].scaling["default"] == layer.scaling
    dash_optimizer = torch.optim.AdamW(adapter_parameters(dash), lr=1e-2)
    oracle_optimizer = torch.optim.AdamW([p for p in oracle.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 6):
        x, y = data(step)
        outputs = []
        for model, optimizer in ((dash, dash_optimizer), (oracle, oracle_optimizer)):
            optimizer.zero_grad()
            output = model(x)
            F.mse_loss(output, y).backward()
            outputs.append(output.detach())
        torch.testing.assert_close(outputs[0], outputs[1], atol=ABSOLUTE, rtol=0)
        for name, layer in layers.items():
            oracle_layer = oracle_layers[name]
            for ours, theirs in (
                (layer.lora_A, oracle_layer.lora_A["default"].weight),
                (layer.lora_B, oracle_layer.lora_B["default"].weight),
            ):
                torch.testing.assert_close(ours.grad, theirs.grad, atol=ABSOLUTE, rtol=0)
                torch.testing.assert_close(ours, theirs, atol=ABSOLUTE, rtol=0)
        dash_optimizer.step()
        oracle_optimizer.step()


# ------------------------------------------------------------------- the export, loaded by PEFT
@pytest.mark.parametrize("kind", TARGETS)
@pytest.mark.parametrize("steps", [T - 2, T + 10], ids=["pre-launch", "dash"])
def test_exported_adapter_loaded_by_peft_reproduces_the_outputs(kind, steps, tmp_path):
    dash = trained(dash_model(TARGETS[kind]), steps).eval()
    save_peft_adapter(dash, tmp_path)
    oracle = load_into_peft(base_model(), tmp_path)
    x = data(-1)[0]
    with torch.no_grad():
        assert relative_error(oracle(x), dash(x)) <= RELATIVE


def test_rslora_export_loaded_by_peft_reproduces_the_outputs(tmp_path):
    """PEFT is told nothing of rsLoRA: the scaling ``α/√r`` is folded into ``B'``."""
    dash = trained(dash_model(TARGETS["mixed"], use_rslora=True), T + 10).eval()
    save_peft_adapter(dash, tmp_path)
    oracle = load_into_peft(base_model(), tmp_path)
    x = data(-1)[0]
    with torch.no_grad():
        assert relative_error(oracle(x), dash(x)) <= RELATIVE


@pytest.mark.parametrize("kind", TARGETS)
def test_peft_holds_exactly_the_exported_factors(kind, tmp_path):
    dash = trained(dash_model(TARGETS[kind]), T + 3)
    save_peft_adapter(dash, tmp_path)
    oracle_layers = peft_lora_layers(load_into_peft(base_model(), tmp_path))
    factors = export_lora(dash)
    assert oracle_layers.keys() == factors.keys()
    for name, layer_factors in factors.items():
        assert torch.equal(oracle_layers[name].lora_A["default"].weight, layer_factors.A)
        assert torch.equal(oracle_layers[name].lora_B["default"].weight, layer_factors.B)
        assert oracle_layers[name].scaling["default"] == 1.0


@pytest.mark.parametrize("kind", TARGETS)
def test_merged_lora_dash_equals_peft_merge_and_unload_of_the_export(kind, tmp_path):
    dash = trained(dash_model(TARGETS[kind]), T + 10).eval()
    save_peft_adapter(dash, tmp_path)
    merged_by_peft = load_into_peft(base_model(), tmp_path).merge_and_unload()
    for layer in dash_layers(dash).values():
        layer.merge()
    x = data(-1)[0]
    with torch.no_grad():
        assert relative_error(merged_by_peft(x), dash(x)) <= RELATIVE
    for name, layer in dash_layers(dash).items():
        theirs = merged_by_peft.get_submodule(name).weight
        torch.testing.assert_close(layer.base.weight, theirs, atol=ABSOLUTE, rtol=0)


def test_export_is_exact_in_peft_training_mode_with_dropout(tmp_path):
    """One dropout mask for both branches (METHOD.md §4) makes the export exact in training, too:
    PEFT draws the same mask per layer from the same generator."""
    dash = trained(dash_model(TARGETS["mixed"], dropout=0.25), T + 5).train()
    save_peft_adapter(dash, tmp_path)
    oracle = load_into_peft(base_model(), tmp_path).train()
    assert oracle.peft_config["default"].lora_dropout == 0.25
    x = data(-1)[0]
    with torch.no_grad():
        torch.manual_seed(9)
        ours = dash(x)
        torch.manual_seed(9)
        assert relative_error(oracle(x), ours) <= RELATIVE


def test_keys_and_shapes_match_peft_save_pretrained(tmp_path):
    from safetensors.torch import load_file

    dash = trained(dash_model(TARGETS["mixed"]), T + 1)
    save_peft_adapter(dash, tmp_path / "ours")
    config = peft.LoraConfig(r=R + S, lora_alpha=R + S, target_modules=TARGETS["mixed"])
    peft.get_peft_model(base_model(), config).save_pretrained(str(tmp_path / "peft"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    loaded = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
    assert (loaded.r, loaded.lora_alpha, loaded.fan_in_fan_out) == (R + S, R + S, True)
    assert set(loaded.target_modules) == set(TARGETS["mixed"])


def test_layers_of_different_rank_load_through_zero_padding(tmp_path):
    dash = base_model()
    torch.manual_seed(1)
    inject(dash, "fc", r=2, alpha=3.0, s=1)
    inject(dash, "proj|head", r=R, alpha=ALPHA, s=S)
    dash = trained(dash, T + 4).eval()
    save_peft_adapter(dash, tmp_path)
    oracle = load_into_peft(base_model(), tmp_path)
    assert peft_lora_layers(oracle)["fc"].r["default"] == R + S
    factors = export_lora(dash)
    assert torch.equal(peft_lora_layers(oracle)["fc"].lora_A["default"].weight, pad_rank(factors["fc"], R + S).A)
    x = data(-1)[0]
    with torch.no_grad():
        assert relative_error(oracle(x), dash(x)) <= RELATIVE


def test_ambiguous_names_load_through_the_regex_and_adapt_nothing_else(tmp_path):
    def nested() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 8), nn.Sequential(nn.Linear(8, 8)), nn.Linear(8, 10))

    dash = nested()
    inject(dash, "0|2", r=R, alpha=ALPHA, s=S)  # "1.0" ends with ".0" but is not adapted
    dash = trained(dash, T + 4).eval()
    save_peft_adapter(dash, tmp_path)
    oracle = load_into_peft(nested(), tmp_path)
    assert peft_lora_layers(oracle).keys() == {"0", "2"}
    x = data(-1)[0]
    with torch.no_grad():
        assert relative_error(oracle(x), dash(x)) <= RELATIVE


# ------------------------------------------------------------- a classifier with a head trained in full
BERT_TARGETS, HEAD = ["query", "value"], ["classifier"]


def tiny_bert() -> nn.Module:
    """A seeded ``BertForSequenceClassification`` from a tiny config: the "pretrained" model, head included."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def tokens(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2000 + step)
    return torch.randint(64, (8, 12), generator=generator), torch.randint(3, (8,), generator=generator)


def classification_loss(model: nn.Module, step: int, micro: int) -> Tensor:
    ids, labels = tokens(step)
    return model(input_ids=ids, labels=labels).loss


@pytest.fixture(scope="module")
def bert_with_trained_head() -> nn.Module:
    """LoRA-Dash on query and value, the classifier trained in full, a few steps past the launch."""
    model = tiny_bert()
    torch.manual_seed(1)
    inject(model, BERT_TARGETS, r=R, alpha=ALPHA, s=S, modules_to_save=HEAD)
    _, controller = train(model, T + 3, launch_step=T, loss=classification_loss)
    assert controller.launched and set(trained_modules(model)) == set(HEAD)
    return model.eval()


def test_peft_serves_the_trained_classifier_head_included(bert_with_trained_head, tmp_path):
    dash = bert_with_trained_head
    assert not torch.equal(dash.classifier.weight, tiny_bert().classifier.weight)  # the head did train
    save_peft_adapter(dash, tmp_path)
    oracle = load_into_peft(tiny_bert(), tmp_path)
    assert peft_lora_layers(oracle).keys() == dash_layers(dash).keys()  # list targets select as PEFT's do
    ids = tokens(-1)[0]
    with torch.no_grad():
        assert relative_error(oracle(input_ids=ids).logits, dash(input_ids=ids).logits) <= RELATIVE


def test_head_keys_and_config_match_peft_save_pretrained(bert_with_trained_head, tmp_path):
    from safetensors.torch import load_file

    save_peft_adapter(bert_with_trained_head, tmp_path / "ours")
    config = peft.LoraConfig(r=R + S, lora_alpha=R + S, target_modules=BERT_TARGETS, modules_to_save=HEAD)
    peft.get_peft_model(tiny_bert(), config).save_pretrained(str(tmp_path / "peft"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "base_model.model.classifier.weight" in ours
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "ours")).modules_to_save == HEAD
