"""dissect.options: flags, validation, recorded options and result keys all come from one declaration."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from broden.errors import InputError
from cgl_train.config import CGLOptions, TrainConfig
from dissect.config import RESULT_FIELDS, DissectConfig, LoadOptions, RunSettings
from dissect.options import Options, add_flags, comma_list, option


@dataclass
class Toy(Options):
    """A new option class: each option is written once, below, and nowhere else."""

    rate: float = option(0.5, "a rate", low=0.0, high=1.0, results=True)
    names: list[str] | None = option(None, "some names")
    mode: str = option("a", "a mode", choices=("a", "b"), results=True)
    verbose: bool = option(False, "talk more")
    on: bool = option(True, "switched on; --no-on turns it off")
    size: int | None = option(None, "a size", flag="--px", low=1)


def parse(cls: type, argv: list[str], **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_flags(p, cls, **kw)
    return p.parse_args(argv)


def test_one_declaration_gives_flags_defaults_record_and_result_key() -> None:
    toy = Toy.from_args(parse(Toy, ["--rate", "0.25", "--names", "x,y", "z", "--mode", "b", "--verbose",
                                    "--no-on", "--px", "7"]))
    assert toy == Toy(rate=0.25, names=["x", "y", "z"], mode="b", verbose=True, on=False, size=7)
    assert Toy.from_args(parse(Toy, [])) == Toy()
    assert Toy.result_fields() == {"rate", "mode"}
    assert Toy.flags() == {"rate": "--rate", "names": "--names", "mode": "--mode", "verbose": "--verbose",
                           "on": "--no-on", "size": "--px"}
    assert Toy.from_dict(toy.to_dict()) == toy


def test_errors_name_the_flag_the_field_and_what_is_valid() -> None:
    with pytest.raises(InputError, match=r"--rate 1.5 \(option rate\): expected a finite number in \[0, 1\]"):
        Toy(rate=1.5).validate()
    with pytest.raises(InputError, match=r"--px 0 \(option size\): expected a positive integer or null"):
        Toy(size=0).validate()
    with pytest.raises(InputError, match=r"--mode 'c' \(option mode\): expected one of a, b"):
        Toy(mode="c").validate()
    with pytest.raises(InputError, match=r"cfg.json: unknown option\(s\) \['rat'\]"):
        Toy.from_dict({"rat": 1}, "cfg.json")
    for bad in (math.nan, math.inf, -math.inf):  # non-finite floats are refused by the one validator
        with pytest.raises(InputError, match="finite"):
            Toy(rate=bad).validate()
    with pytest.raises(argparse.ArgumentError, match="not a finite number"):
        parse(Toy, ["--rate", "nan"])


def test_suppressed_flags_override_only_what_was_given() -> None:
    args = parse(Toy, ["--mode", "b"], suppress=True)
    assert vars(args) == {"mode": "b"}
    assert Toy.from_args(args, base={"rate": 0.75}) == Toy(rate=0.75, mode="b")


def test_python_api_values_are_normalised() -> None:
    assert Toy(names="a,b").validate().names == ["a", "b"]
    assert Toy(names=("a",)).validate().names == ["a"]
    assert comma_list(["a, b", "c"]) == ["a", "b", "c"] and comma_list(None) is None

    @dataclass
    class Paths(Options):
        out: str = option("x", "a directory")

    assert Paths(out=Path("/tmp/y")).validate().to_dict() == {"out": "/tmp/y"}


def test_dissect_options_are_declared_once() -> None:
    assert RESULT_FIELDS == DissectConfig.result_fields()
    assert "device" not in RESULT_FIELDS and "batch_size" not in RESULT_FIELDS and "top_fraction" in RESULT_FIELDS
    base = DissectConfig()
    assert base.result_key() == DissectConfig(batch_size=7, device="cpu").result_key()
    assert base.result_key() != DissectConfig(top_fraction=0.01).result_key()
    p = argparse.ArgumentParser()
    for cls in (LoadOptions, DissectConfig, RunSettings):
        add_flags(p, cls)
    args = p.parse_args(["--quantile", "0.01", "--layers", "conv1,conv2", "conv3", "--categories",
                         "object,part", "scene", "--mirror", "http://a", "--mirror", "http://b", "--arch", "x"])
    config = DissectConfig.from_args(args)
    assert config.top_fraction == 0.01 and config.layers == ["conv1", "conv2", "conv3"]
    assert config.categories == ["object", "part", "scene"]
    assert RunSettings.from_args(args).mirrors == ["http://a", "http://b"]
    assert LoadOptions.from_args(args).arch == "x"
    # every option of the three classes has exactly one flag, and no flag is declared twice
    flags = [f for cls in (LoadOptions, DissectConfig, RunSettings) for f in cls.flags().values()]
    assert len(flags) == len(set(flags))


def test_training_options_include_the_cgl_options_declared_once() -> None:
    cgl = set(CGLOptions.option_names())
    assert cgl <= set(TrainConfig.option_names())
    config = TrainConfig(lambda_g=0.5, pairs_per_filter=2, block_norm_mode="proximal", lambda_bn=0.1)
    options = config.cgl_options()
    assert type(options) is CGLOptions and options.to_dict() == {k: config.to_dict()[k] for k in cgl}
    # composite and constant flags: --groups sets a default and per-layer values, --prox a mode
    from cgl_train.cli import build_parser, config_from_args

    parsed = config_from_args(build_parser().parse_args(["--groups", "4,conv2=8", "--prox", "--lambda-bn", "1"]))
    assert (parsed.groups, parsed.group_overrides, parsed.block_norm_mode) == (4, {"conv2": 8}, "proximal")
    # records written before block_norm_mode existed are still read
    assert TrainConfig.from_dict({"prox": True, "lambda_bn": 1.0}).block_norm_mode == "proximal"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cgl_train_refuses_non_finite_floats(value, tmp_path, capsys) -> None:
    from cgl_train.cli import main

    assert main(["--lr", value, "--out", str(tmp_path / "x")]) == 2
    assert "--lr" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
