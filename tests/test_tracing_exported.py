import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxsplit
from fxsplit.tracing import trace_graph
from fxsplit.tracing.exported import counted_batch_norm, trace_exported
from tests.models import MultiHead, SmallCNN, assert_unchanged, snapshot
from tests.mtan import MTAN
from tests.real_models import DictBatch, TiedLM, dict_batch
from tests.test_tracing import Wrapper


def run_copies(model: nn.Module, gm: nn.Module, *args, training: bool, **kwargs):
    """Outputs and states of copies of ``model`` (in the given mode) and of the graph, on the same input."""
    model, gm = copy.deepcopy(model).train(training), copy.deepcopy(gm)
    expected, got = model(*args, **kwargs), gm(*args, **kwargs)
    return expected, got, model.state_dict(), gm.state_dict()


def assert_same_outputs(expected: dict, got: dict) -> None:
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = MultiHead(SmallCNN(), 16)
    x = torch.randn(4, 3, 8, 8)
    return model, x, {mode: trace_exported(model, x, training=mode) for mode in (False, True)}


def test_paths_names_and_parameter_reads(cnn):
    model, _, graphs = cnn
    gm = graphs[True]
    assert gm.meta["route"] == "export"
    paths = {node.name: node.meta["path"] for node in gm.graph.nodes}
    assert all(name == path.replace(".", "_") for name, path in paths.items())
    calls = [node.meta["path"] for node in gm.graph.nodes if node.op == "call_function"]
    assert calls[:3] == ["backbone.stem.0.conv2d", "backbone.stem.1.batch_norm", "backbone.stem.2.relu"]
    assert calls.count("backbone.block1.relu.relu") == 1 and "backbone.block1.relu.relu_1" in calls  # called twice
    assert "backbone.block1.add" in calls and calls[-2:] == ["heads.a.linear", "heads.b.linear"]
    reads = [node.target for node in gm.graph.nodes if node.op == "get_attr"]
    assert len(reads) == len(set(reads))
    assert set(reads) == {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    assert all(gm.graph.find_nodes(op="get_attr", target=t)[0].meta["path"] == t for t in reads)


def test_linear_and_batchnorm_nodes_read_their_module_parameters(cnn):
    gm = cnn[2][True]
    linear = next(n for n in gm.graph.nodes if n.meta["path"] == "heads.a.linear")
    assert linear.target is torch.ops.aten.linear.default
    assert [arg.target for arg in linear.args[1:]] == ["heads.a.weight", "heads.a.bias"]
    norm = next(n for n in gm.graph.nodes if n.meta["path"] == "backbone.stem.1.batch_norm")
    assert norm.target is counted_batch_norm  # counts the batch in num_batches_tracked, then normalises
    assert [arg.target for arg in norm.args[1:6]] == [f"backbone.stem.1.{name}" for name in
                                                      ("weight", "bias", "running_mean", "running_var",
                                                       "num_batches_tracked")]
    assert norm.args[6] is True  # the train flag is part of the graph


@pytest.mark.parametrize("training", [False, True])
def test_exact_in_both_modes_with_buffer_updates_and_another_batch(cnn, training):
    model, _, graphs = cnn
    x = torch.randn(7, 3, 8, 8)  # traced with a batch of 4
    expected, got, model_state, graph_state = run_copies(model, graphs[training], x, training=training)
    assert_same_outputs(expected, got)
    assert set(graph_state) == set(model_state)
    for key, value in model_state.items():
        assert torch.equal(graph_state[key], value), key
    assert model_state["backbone.stem.1.num_batches_tracked"].item() == int(training)


def test_batchnorm_counts_batches_in_its_own_node_only_in_train_mode(cnn):
    norms = {mode: [n.target for n in gm.graph.nodes if "batch_norm" in n.name] for mode, gm in cnn[2].items()}
    assert norms[True] == [counted_batch_norm] * 6 and norms[False] == [torch.ops.aten.batch_norm.default] * 6
    increments = [n for gm in cnn[2].values() for n in gm.graph.nodes if n.target is torch.ops.aten.add_.Tensor
                  and n.args[0].op == "get_attr"]
    assert increments == []  # torch.export's separate count, with no users, is gone


def test_model_untouched_and_tensors_copied_or_shared():
    model = MultiHead(SmallCNN(), 16).eval()
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    copied = trace_exported(model, x, training=True)
    shared = trace_graph(model, method="export", example=((x,), {}))  # in the model's mode
    assert_unchanged(model, before)
    assert copied.training and not shared.training and not model.training
    parameters = dict(model.named_parameters())
    assert all(p is not parameters[name] and torch.equal(p, parameters[name]) for name, p in copied.named_parameters())
    assert all(p is parameters[name] for name, p in shared.named_parameters())
    state = model.state_dict(keep_vars=True)
    assert set(shared.state_dict()) == set(state)  # eval graphs read no num_batches_tracked: kept all the same
    assert all(tensor is state[key] for key, tensor in shared.state_dict(keep_vars=True).items())


def test_a_model_both_routes_trace_gives_the_same_computation_over_the_same_layers(cnn):
    model, x, graphs = cnn
    symbolic = fxsplit.trace(copy.deepcopy(model).eval())
    modules = dict(model.named_modules())
    fx_layers = [node.target for node in symbolic.graph.nodes
                 if node.op == "call_module" and next(modules[node.target].parameters(), None) is not None]
    parameters = dict(model.named_parameters())
    reads = [arg.target for node in graphs[False].graph.nodes for arg in node.all_input_nodes
             if arg.op == "get_attr" and arg.target in parameters]
    export_layers = list(dict.fromkeys(name.rpartition(".")[0] for name in reads))
    owners = {name for name, module in modules.items() if next(module.parameters(recurse=False), None) is not None}
    assert export_layers == fx_layers and set(fx_layers) == owners
    assert_same_outputs(symbolic(x), graphs[False](x))


def test_the_mode_is_fixed(cnn):
    train, evaluation = copy.deepcopy(cnn[2][True]), copy.deepcopy(cnn[2][False])
    assert train.train() is train and evaluation.eval() is evaluation
    with pytest.raises(fxsplit.TraceError, match="traced through torch.export in train mode.*training=False"):
        train.eval()
    with pytest.raises(fxsplit.TraceError, match="in eval mode.*training=True"):
        evaluation.train()


@pytest.mark.parametrize("training", [False, True])
def test_dropout_nodes_carry_probability_and_mode(training):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.25))
    gm = trace_exported(model, torch.randn(2, 4), training=training)
    dropout = [node for node in gm.graph.nodes if node.target is torch.ops.aten.dropout.default]
    assert [(node.meta["path"], node.args[1:]) for node in dropout] == [("1.dropout", (0.25, training))]


def test_tied_weights_are_read_under_the_owning_module_name():
    model = TiedLM()
    ids = torch.randint(0, 24, (3, 5))
    gm = trace_exported(model, ids)
    reads = {node.meta["path"]: [arg.target for arg in node.args if isinstance(arg, torch.fx.Node)
                                 and arg.op == "get_attr"] for node in gm.graph.nodes if node.op == "call_function"}
    assert reads["embed.embedding"] == ["embed.weight"]
    assert reads["decoder.linear"] == ["decoder.weight"]
    assert reads["linear"] == ["embed.weight"]  # no module owns the read: the first name
    assert gm.get_parameter("decoder.weight") is gm.get_parameter("embed.weight")
    assert len(list(gm.parameters())) == len(list(model.parameters())) == 7  # the tied matrix once
    assert_same_outputs(model(ids), gm(ids))


def test_dict_and_nested_inputs_keep_their_structure_and_a_dynamic_batch():
    model = DictBatch().eval()
    gm = trace_exported(model, (dict_batch(3),), {"scale": 2.0})
    assert [node.target for node in gm.graph.find_nodes(op="placeholder")] == ["batch", "scale"]
    sizes = [node.args for node in gm.graph.nodes if node.target is torch.ops.aten.sym_size.int]
    assert [(pixels.args[1], pixels.args[0].args, dim) for pixels, dim in sizes] == [
        ("pixels", (gm.graph.find_nodes(op="placeholder")[0], "image"), 0)]  # the batch size, read from the input
    batch = dict_batch(6)
    expected, got = model(batch, scale=2.0), gm(batch, scale=2.0)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[0].shape[0] == 6  # the batch size is read from the input, not frozen at 3


class TaskArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({"seg": nn.Linear(4, 2), "depth": nn.Linear(4, 1)})

    def forward(self, x, task="seg", mask=None):
        out = self.heads[task](x)
        return out if mask is None else out * mask


def test_non_tensor_arguments_are_fixed_and_checked():
    model = TaskArgument()
    x = torch.randn(2, 4)
    gm = trace_exported(model, (x,), {"task": "depth", "mask": None})
    assert torch.equal(gm(x, task="depth", mask=None), model(x, task="depth"))
    with pytest.raises(AssertionError, match="traced with task='depth'"):
        gm(x, task="seg", mask=None)
    with pytest.raises(AssertionError, match="traced with mask=None"):
        gm(x, task="depth", mask=torch.ones(2, 1))


def test_keyword_inputs_become_placeholders_in_forward_order():
    model = TaskArgument()
    x = torch.randn(2, 4)
    gm = trace_exported(model, (), {"mask": torch.ones(2, 2), "x": x})
    assert [node.target for node in gm.graph.find_nodes(op="placeholder")] == ["x", "mask"]
    assert torch.equal(gm(x, torch.ones(2, 2)), model(x, mask=torch.ones(2, 2)))


class Variadic(nn.Module):
    def forward(self, *xs):
        return sum(xs)


@pytest.mark.parametrize("model, args, message", [
    (Wrapper(), (torch.randn(3, 4),), r"module 'inner.1' \(DataDependent\).*test_tracing.py:\d+: if x.sum\(\) > 0"
                                      r".*torch.where"),
    (Wrapper(), (torch.randn(3, 5),), r"cannot trace module 'lin' \(Linear\).*check that model"),
    (Wrapper(), (torch.randn(3, 4), torch.randn(3, 4)), r"does not fit Wrapper.forward\(x\)"),
    (Variadic(), (torch.randn(2), torch.randn(2)), r"variadic parameter\(s\) \['xs'\]"),
    (lambda x: x, (torch.randn(2),), "traces an nn.Module, got function"),
])
def test_failures_are_trace_errors_that_say_where_and_what_to_do(model, args, message):
    with pytest.raises(fxsplit.TraceError, match=message):
        trace_exported(model, args)


def test_the_graph_exports_again_after_an_edit_with_a_dynamic_batch(cnn):
    model, x, graphs = cnn
    gm = copy.deepcopy(graphs[False])
    head = next(n for n in gm.graph.nodes if n.meta["path"] == "heads.b.linear")
    gm.register_parameter("heads_b_weight_copy", nn.Parameter(model.heads.b.weight.detach() * 2))
    with gm.graph.inserting_before(head):
        head.update_arg(1, gm.graph.get_attr("heads_b_weight_copy"))  # the kind of edit a split makes
    gm.recompile()
    program = torch.export.export(gm, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    batch = torch.randn(9, 3, 8, 8)
    reference = copy.deepcopy(model).eval()
    features = reference.backbone(batch)
    assert torch.allclose(program.module()(batch)["b"], F.linear(features, reference.heads.b.weight * 2,
                                                                 reference.heads.b.bias))


def test_torchscript_cannot_compile_the_graph(cnn):
    with pytest.raises(fxsplit.ExportError, match="TorchScript cannot compile"):
        fxsplit.script(cnn[2][False])


@pytest.fixture(scope="module")
def mtan():
    torch.manual_seed(0)
    model = MTAN()
    x = torch.randn(4, 3, 16, 16)
    return model, {mode: trace_exported(model, x, training=mode) for mode in (False, True)}


def test_mtan_shape_branch_stops_the_fx_route():
    with pytest.raises(fxsplit.TraceError, match=r"'attention.segmentation.1' \(TaskAttention\).*mtan.py:\d+: "
                                                 r"if previous.size\(\)\[-2:\] != middle.size\(\)\[-2:\]"):
        fxsplit.trace(MTAN())


@pytest.mark.parametrize("training", [False, True])
def test_mtan_is_exact_in_both_modes(mtan, training):
    model, graphs = mtan
    expected, got, model_state, graph_state = run_copies(model, graphs[training], torch.randn(6, 3, 16, 16),
                                                         training=training)
    assert_same_outputs(expected, got)
    assert all(torch.equal(graph_state[key], value) for key, value in model_state.items())
    resized = {node.meta["path"] for node in graphs[training].graph.nodes
               if node.target is torch.ops.aten.upsample_bilinear2d.vec}
    assert {"attention.depth.1.upsample_bilinear2d", "attention.segmentation.2.upsample_bilinear2d"} <= resized


def test_mtan_graph_refuses_a_size_it_was_not_traced_for(mtan):
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[2\] == 16"):
        mtan[1][False](torch.randn(4, 3, 32, 32))


@pytest.fixture(scope="module")
def traced_bert(bert):
    model, example = bert
    return model, example, {mode: trace_exported(model, example, training=mode) for mode in (False, True)}


@given(batch=st.integers(1, 6), kept=st.lists(st.integers(1, 8), min_size=1, max_size=6), training=st.booleans())
def test_bert_follows_padding_masks_and_batch_sizes(traced_bert, batch, kept, training):
    from tests.hf_models import token_batch

    model, _, graphs = traced_bert
    ids, mask = token_batch(batch, padded=tuple(kept))
    expected, got, _, _ = run_copies(model, graphs[training], ids, mask, training=training)
    assert_same_outputs(expected, got)


def test_bert_padding_changes_the_output_and_an_unpadded_trace_follows_it(traced_bert):
    from tests.hf_models import token_batch

    model, (ids, mask), _ = traced_bert
    model = copy.deepcopy(model).eval()
    unpadded = torch.ones_like(mask)
    gm = trace_exported(model, (ids, unpadded))
    assert not torch.equal(model(ids, mask)["topic"], model(ids, unpadded)["topic"])
    assert_same_outputs(model(ids, mask), gm(ids, mask))
    longer = token_batch(4, length=10)
    with pytest.raises(AssertionError, match=r"Guard failed: input_ids.size\(\)\[1\] == 8"):
        gm(*longer)


def test_bert_reads_every_parameter_by_name_inside_its_module(traced_bert):
    model, _, graphs = traced_bert
    gm = graphs[False]
    reads = {node.target: node for node in gm.graph.find_nodes(op="get_attr")}
    assert {name for name, _ in model.named_parameters()} <= set(reads)
    scopes = {user.meta["path"] for user in reads["bert.encoder.layer.0.attention.self.query.weight"].users}
    assert scopes == {"bert.encoder.layer.0.attention.self.query.linear"}
    query = next(iter(reads["bert.encoder.layer.0.attention.self.query.bias"].users))
    assert query.target is torch.ops.aten.linear.default
    linears = [node for node in gm.graph.nodes if node.target is torch.ops.aten.linear.default]
    assert len(linears) == 2 * 6 + 3  # six per layer, the pooler, two heads


def test_bert_round_trips_through_pt2(traced_bert, tmp_path):
    model, example, graphs = traced_bert
    from tests.hf_models import token_batch

    path = fxsplit.export(graphs[False], tmp_path / "bert.pt2", example)
    loaded = torch.export.load(path).module()
    ids, mask = token_batch(3)
    assert_same_outputs(copy.deepcopy(model).eval()(ids, mask), loaded(ids, mask))


def test_bert_language_model_head_stays_tied():
    pytest.importorskip("transformers", reason="HuggingFace models are an optional test dependency")
    from tests.hf_models import bert_masked_lm, token_batch

    model = bert_masked_lm().eval()
    ids, mask = token_batch(2)
    gm = trace_exported(model, (), {"input_ids": ids, "attention_mask": mask})
    embedding, decoder = "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"
    assert [user.meta["path"] for user in gm.graph.find_nodes(op="get_attr", target=embedding)[0].users] == [
        "bert.embeddings.word_embeddings.embedding"]
    assert [user.meta["path"] for user in gm.graph.find_nodes(op="get_attr", target=decoder)[0].users] == [
        "cls.predictions.decoder.linear"]
    assert gm.get_parameter(embedding) is gm.get_parameter(decoder)
    assert torch.equal(gm(input_ids=ids, attention_mask=mask)["logits"], model(ids, attention_mask=mask).logits)


def test_vit_reads_its_embeddings_as_parameters_of_their_module():
    pytest.importorskip("transformers", reason="HuggingFace models are an optional test dependency")
    from tests.hf_models import ViTTwoHeads

    torch.manual_seed(0)
    model = ViTTwoHeads().eval()
    gm = trace_exported(model, torch.randn(2, 3, 16, 16))
    users = {node.target: [user.meta["path"] for user in node.users] for node in gm.graph.find_nodes(op="get_attr")}
    assert users["vit.embeddings.cls_token"] == ["vit.embeddings.expand"]
    assert users["vit.embeddings.position_embeddings"] == ["vit.embeddings.add"]
    images = torch.randn(5, 3, 16, 16)
    assert_same_outputs(model(images), gm(images))
