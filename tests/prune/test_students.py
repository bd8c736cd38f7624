"""Students from teachers: shallow copies with transferred weights, narrow copies by pruning, saving as data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from spiralkit.prune.students import (
    NarrowStudent,
    PrunedStudent,
    ShallowStudent,
    StudentLayout,
    StudentSpec,
    apply_student,
    build_student,
    find_layer_stacks,
    load_student,
    plan_student,
    save_student,
    student_architecture,
)
from spiralkit.errors import ModelError
from spiralkit.models import ModelSpec, lenet5, load_model, resnet20

transformers = pytest.importorskip("transformers")


def tiny_encoder(*, layers: int = 4) -> nn.Module:
    """Embedding → nn.TransformerEncoder (width 8, 2 heads) → mean → Linear."""
    torch.manual_seed(0)
    return _MeanHead(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), layers,
                                           enable_nested_tensor=False))


class _MeanHead(nn.Module):
    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.encoder = encoder
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.encoder(self.embed(x)).mean(1))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bert")
    config = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=6, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture
def bert_spec(bert_dir: Path) -> ModelSpec:
    return ModelSpec(name="hf", kwargs={"path": str(bert_dir), "num_labels": 2})


def _tokens(batch: int = 3, length: int = 7) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (batch, length), generator=generator)
    return torch.stack([ids, torch.ones_like(ids)], dim=1)


# --------------------------------------------------------------------------- shallow


def test_every_second_bert_layer_is_kept_with_its_weights(bert_spec: ModelSpec) -> None:
    teacher = load_model(bert_spec)
    layout = plan_student(ShallowStudent(every=2), teacher, example=_tokens())
    assert [(s.module, s.size, s.keep) for s in layout.stacks] == [("encoder.encoder.layer", 6, (0, 2, 4))]
    assert layout.layer_pairs()[1] == ("encoder.encoder.layer.1", "encoder.encoder.layer.2")
    student = apply_student(copy.deepcopy(teacher), layout)
    assert len(student.encoder.encoder.layer) == 3 and student.encoder.config.num_hidden_layers == 3
    assert len(teacher.encoder.encoder.layer) == 6 and teacher.encoder.config.num_hidden_layers == 6
    assert student.encoder.encoder.layer[2].attention.self.layer_idx == 2
    for student_layer, teacher_layer in layout.layer_pairs():
        ours, theirs = student.get_submodule(student_layer).state_dict(), teacher.get_submodule(teacher_layer).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    teacher_state = teacher.state_dict()
    assert all(torch.equal(v, teacher_state[k]) for k, v in student.state_dict().items() if ".layer." not in k)
    with torch.no_grad():
        assert student(_tokens()).shape == (3, 2)


def test_explicit_layers_and_a_hand_checked_forward() -> None:
    teacher = tiny_encoder().eval()
    assert find_layer_stacks(teacher) == ("encoder.layers",)
    student = build_student(ShallowStudent(keep=(1, 3)), teacher, example=torch.randint(0, 10, (2, 5)))
    assert student.encoder.num_layers == 2 and len(student.encoder.layers) == 2
    x = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        h = teacher.encoder.layers[3](teacher.encoder.layers[1](teacher.embed(x)))
        torch.testing.assert_close(student(x), teacher.fc(h.mean(1)))


def test_resnet_stages_drop_blocks_but_never_the_downsampling_one() -> None:
    teacher = resnet20().eval()
    images = torch.randn(2, 3, 32, 32)
    assert find_layer_stacks(teacher) == ("layer1", "layer2", "layer3")
    student = build_student(ShallowStudent(every=2), teacher, example=images)
    assert [len(getattr(student, f"layer{i}")) for i in (1, 2, 3)] == [2, 2, 2]
    assert torch.equal(student.layer2[1].conv1.weight, teacher.layer2[2].conv1.weight)
    assert student(images).shape == (2, 10)
    with pytest.raises(ModelError, match=r"cannot drop 'layer2.0': it maps shape \(2, 16, 32, 32\) to \(2, 32, 16, 16\)"):
        build_student(ShallowStudent(keep=(1, 2)), teacher, example=images)
    only = build_student(ShallowStudent(every=2, stacks=("layer3",)), teacher)
    assert [len(getattr(only, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 2]


def test_shallow_errors_name_the_module() -> None:
    with pytest.raises(ModelError, match=r"keeps layer 4 of 'encoder.layers', which has 4 layers \(0..3\)"):
        build_student(ShallowStudent(keep=(0, 4)), tiny_encoder())
    with pytest.raises(ModelError, match="no layer stack found in LeNet5"):
        build_student(ShallowStudent(every=2), lenet5())
    with pytest.raises(ModelError, match=r"has no module 'encoder.blocks'.*modules are: encoder.layers"):
        build_student(ShallowStudent(every=2, stacks=("encoder.blocks",)), tiny_encoder())
    with pytest.raises(ModelError, match="stack 'fc' is a Linear, not an nn.Sequential or nn.ModuleList"):
        build_student(ShallowStudent(every=2, stacks=("fc",)), tiny_encoder())
    model = tiny_encoder()
    layout = plan_student(ShallowStudent(every=2), model)
    apply_student(model, layout)
    with pytest.raises(ModelError, match=r"'encoder.layers' has 2 layers, the layout expects 4 \(was it already applied\?\)"):
        apply_student(model, layout)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kind": "shallow"}, "exactly one of `every`"),
        ({"kind": "shallow", "every": 2, "keep": [0]}, "exactly one of `every`"),
        ({"kind": "shallow", "keep": [2, 0]}, r"distinct layer indices in increasing order, got \[2, 0\]"),
        ({"kind": "shallow", "keep": [-1]}, "greater than or equal to 0"),
        ({"kind": "shallow", "every": 0}, "greater than or equal to 1"),
        ({"kind": "narrow", "ratio": 1.0}, "less than 1"),
        ({"kind": "deep"}, "does not match any of the expected tags"),
    ],
)
def test_bad_student_specs_are_rejected(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TypeAdapter(StudentSpec).validate_python(config)


def test_student_specs_parse_from_recipe_values() -> None:
    adapter = TypeAdapter(StudentSpec)
    assert adapter.validate_python("pruned") == PrunedStudent()
    assert adapter.validate_python({"kind": "shallow", "every": 2}) == ShallowStudent(every=2)
    assert adapter.validate_python({"kind": "shallow", "keep": [0, 2, 4]}).keep == (0, 2, 4)
    assert adapter.validate_python({"kind": "narrow", "ratio": 0.5, "criterion": "taylor"}).criterion.kind == "taylor"


# --------------------------------------------------------------------------- narrow and pruned


def test_narrow_student_is_the_structurally_pruned_teacher(bert_spec: ModelSpec, tmp_path: Path) -> None:
    teacher = load_model(bert_spec)
    x = _tokens()
    layout = plan_student(NarrowStudent(ratio=0.5), teacher, example=x)
    assert layout.plan is not None and layout.plan.removed()["heads"] == 12
    student = apply_student(copy.deepcopy(teacher), layout)
    layer = student.encoder.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 2 and layer.intermediate.dense.out_features == 16
    assert teacher.encoder.encoder.layer[0].intermediate.dense.out_features == 32
    save_student(student, tmp_path, model_spec=bert_spec, layout=layout)
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path)(x), student(x))
    with pytest.raises(ModelError, match="narrow student is made by structured pruning, which needs an example"):
        build_student(NarrowStudent(ratio=0.5), teacher)
    with pytest.raises(ModelError, match="narrow student's architecture depends on the prune plan"):
        student_architecture(bert_spec, NarrowStudent(ratio=0.5))


def test_pruned_student_is_a_copy_of_the_teacher() -> None:
    teacher = tiny_encoder().eval()
    student = build_student(PrunedStudent(), teacher)
    assert student is not teacher
    x = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


# --------------------------------------------------------------------------- saving as data


def test_shallow_student_saves_as_data_and_rebuilds_from_the_teacher_spec(bert_spec: ModelSpec, tmp_path: Path) -> None:
    teacher = load_model(bert_spec)
    layout = plan_student(ShallowStudent(keep=(0, 5)), teacher)
    student = apply_student(copy.deepcopy(teacher), layout)
    torch.nn.init.normal_(student.classifier.weight)  # as if fine-tuned: differs from any fresh build
    save_student(student, tmp_path, model_spec=bert_spec, layout=layout)
    assert StudentLayout.model_validate_json((tmp_path / "student.json").read_text()) == layout
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path)(x), student.eval()(x))
    rebuilt = student_architecture(bert_spec, ShallowStudent(keep=(0, 5)))
    assert rebuilt.state_dict().keys() == student.state_dict().keys()


def test_module_function_teacher_rebuilds_and_missing_files_are_named(tmp_path: Path) -> None:
    spec = ModelSpec(name="tests.prune.test_students:tiny_encoder", kwargs={"layers": 4})
    student = build_student(ShallowStudent(every=2), load_model(spec))
    save_student(student, tmp_path, model_spec=spec, layout=plan_student(ShallowStudent(every=2), load_model(spec)))
    assert load_student(tmp_path).encoder.num_layers == 2
    (tmp_path / "student.json").unlink()
    with pytest.raises(ModelError, match=f"{tmp_path} is not a saved student: student.json is missing"):
        load_student(tmp_path)
    (tmp_path / "student.json").write_text('{"spec": {"kind": "tall"}}')
    with pytest.raises(ModelError, match=r"student.json: not a student layout"):
        load_student(tmp_path)
