"""`ollamux plan`: the layout proposed from GPUs and models (planner.py, commands/plan.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.commands.plan import parse_model, run_plan
from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.planner import GIB, Card, Plan, config_dict, plan
from tests.fakes.helpers import gpu, load_fake_nvml

LLAMA70 = parse_model("llama3.3:70b")
QWEN32 = parse_model("qwen2.5:32b")
LLAMA3 = parse_model("llama3.2:3b")


def cards(*gib: float) -> list[Card]:
    return [Card(index=i, name=f"card{i}", memory=int(g * GIB)) for i, g in enumerate(gib)]


def layout(result: Plan) -> list[tuple[tuple[int, ...], tuple[str, ...], int]]:
    return [(tuple(c.index for c in i.cards), i.models, i.num_parallel) for i in result.instances]


def test_known_models_take_their_size_and_kv_from_the_catalogue() -> None:
    assert LLAMA70.weights == 43 * 10**9
    assert LLAMA70.kv_per_token == 320 * 1024
    mine = parse_model("my-model:40")
    assert (mine.name, mine.weights) == ("my-model", 40 * GIB)
    assert parse_model("qwen2.5:32b:30").weights == 30 * GIB  # a known name, another size


def test_a_70b_model_on_four_24_gib_cards_gets_a_group_of_two_for_two_chats_each() -> None:
    result = plan(cards(24, 24, 24, 24), [LLAMA70, QWEN32], users=4)
    # 40 GiB of weights + 2.5 GiB KV per chat: 23.3 GiB usable per card, 46.5 on two = 2 chats
    assert layout(result) == [
        ((0, 1), ("llama3.3:70b",), 2),
        ((2,), ("qwen2.5:32b",), 2),
        ((3,), ("qwen2.5:32b",), 2),
    ]
    text = "\n".join(result.lines)
    assert "llama3.3:70b fits on no single card" in text
    assert "a group of 2 cards, GPU 0+GPU 1: the fewest cards that hold 2 chat(s)" in text


def test_more_users_make_the_group_three_cards_and_say_why() -> None:
    result = plan(cards(24, 24, 24, 24), [LLAMA70, QWEN32], users=8)
    assert layout(result) == [((0, 1, 2), ("llama3.3:70b",), 4), ((3,), ("qwen2.5:32b",), 2)]
    text = "\n".join(result.lines)
    assert "2 cards: 46.5 GiB usable, 2 chat(s); 3 cards: 69.8 GiB usable, 11 chat(s)" in text
    assert "keeping 1 card(s) for the other models" in text
    assert "num_parallel 2, all that fits next to qwen2.5:32b's weights" in text


def test_a_48_gib_card_holds_the_70b_alone_and_the_small_cards_serve_the_32b() -> None:
    result = plan(cards(48, 48, 24, 24), [LLAMA70, QWEN32], users=4)
    assert layout(result) == [
        ((0,), ("llama3.3:70b", "qwen2.5:32b"), 2),
        ((1,), ("llama3.3:70b", "qwen2.5:32b"), 2),
        ((2,), ("qwen2.5:32b",), 2),
        ((3,), ("qwen2.5:32b",), 2),
    ]
    assert all(not i.group for i in result.instances)


def test_cards_no_model_fits_alone_join_the_group() -> None:
    result = plan(cards(24, 24, 24, 24), [LLAMA70], users=4)
    assert layout(result) == [((0, 1, 2, 3), ("llama3.3:70b",), 4)]


def test_a_group_with_room_left_per_card_also_lists_the_small_model() -> None:
    result = plan(cards(24, 24, 24, 24), [LLAMA70, LLAMA3], users=8)
    group = result.instances[0]  # 3 cards with 4 chats of the 70b: ~6.6 GiB left on each
    assert group.group and group.models == ("llama3.3:70b", "llama3.2:3b")
    assert "also fit on one of its cards" in "\n".join(result.lines)


def test_a_model_that_fits_nowhere_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as err:
        plan(cards(24, 24), [LLAMA70, parse_model("huge:120")])
    assert err.value.path == "--model"
    assert "huge needs 127.5 GiB" in str(err.value)
    assert "not even all 2 together (46.5 GiB usable)" in str(err.value)


def test_the_printed_config_is_one_that_config_check_accepts(tmp_path: Path) -> None:
    out = io.StringIO()
    gpus = ["rtx4090:24"] * 4
    run_plan(gpus, ["llama3.3:70b", "qwen2.5:32b"], users=8, emulated=True, out=out)
    path = tmp_path / "plan.yaml"
    path.write_text(out.getvalue(), encoding="utf-8")
    config = load_config(path)
    assert config.instances != "auto"
    assert [(i.name, i.gpu, i.spread, i.num_parallel) for i in config.instances] == [
        ("gpu0-2", ("rtx4090-0", "rtx4090-1", "rtx4090-2"), False, 4),
        ("gpu3", ("rtx4090-3",), False, 2),
    ]
    assert out.getvalue().startswith("# ollamux plan")


def test_without_gpu_flags_it_plans_for_the_gpus_nvml_reads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load_fake_nvml(monkeypatch, [gpu(0), gpu(1), gpu(2), gpu(3)])
    assert main(["plan", "--model", "llama3.3:70b", "--model", "qwen2.5:32b"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "plan.yaml"
    path.write_text(printed, encoding="utf-8")
    config = load_config(path)
    assert config.instances != "auto"
    assert [(i.gpu, i.launcher) for i in config.instances] == [
        ((0, 1), "process"),
        ((2,), "process"),
        ((3,), "process"),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpu", "a:24"], "--model: give the models users run"),
        (["--gpu", "a:24", "--model", "nosuch"], "'nosuch': no built-in size for this model"),
        (["--gpu", "a24", "--model", "qwen2.5:32b"], "--gpu: 'a24' is not NAME:GIB"),
        (["--gpu", "a:24", "--model", "llama3.3:70b"], "llama3.3:70b needs 42.5 GiB"),
        (["--gpu", "a:24", "--model", "qwen2.5:32b", "--users", "0"], "--users: must be >= 1"),
    ],
)
def test_bad_flags_exit_2_with_one_sentence(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_config_dict_uses_gpu_indices_for_a_real_box() -> None:
    result = plan(cards(24, 24, 24, 24), [LLAMA70, QWEN32])
    instances = config_dict(result)["instances"]
    assert instances[0]["gpu"] == [0, 1] and instances[0]["spread"] is False
    assert "emulator" not in config_dict(result)
