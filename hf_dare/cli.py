"""The `hf-dare` command: `hf-dare upcycle`, `hf-dare build`, `hf-dare import-moellava`, `hf-dare report`,
`hf-dare calibrate`.

Each subcommand is a thin wrapper over a function of `hf_dare.conversion`; new subcommands register
themselves in `build_parser` through a `add_<name>_command(subparsers)` function.
"""

import argparse
import json
import sys

from .modeling.routing import ROUTERS


def _numbers(kind: type, what: str):
    """An argparse `type` for one item of a list option: `1`, or several comma-separated `1,3`."""

    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return parse


class _ExtendList(argparse.Action):
    """A list option written space-separated (`--moe-layers 1 3`, as MoE-LLaVA's scripts do), comma-separated
    (`--moe-layers 1,3`) or both: the parts are joined into one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [x for part in values for x in part])


def _add_list_option(parser: argparse.ArgumentParser, name: str, kind: type, what: str, help: str) -> None:
    parser.add_argument(name, nargs="+", type=_numbers(kind, what), action=_ExtendList, default=None, help=help)


def _layer(text: str) -> int | range:
    """`5` -> 5; `2-26` -> range(2, 27) (inclusive bounds)."""
    start, dash, stop = text.strip().partition("-")
    if dash:
        if int(stop) < int(start):
            raise ValueError(text)
        return range(int(start), int(stop) + 1)
    return int(start)


def _router(text: str) -> str | dict[int, str]:
    """An argparse `type` for `--router`: a router name, or a router per MoE layer `0:top_k,2:dare`."""
    if ":" not in text:
        if text not in ROUTERS:
            raise argparse.ArgumentTypeError(f"unknown router {text!r}; allowed: {', '.join(ROUTERS)}")
        return text
    try:
        return {int(layer): name for layer, name in (part.split(":") for part in text.split(",") if part.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER:ROUTER pairs like 0:top_k,2:dare, got {text!r}") from None


def _setting(text: str) -> tuple[str, object]:
    """An argparse `type` for `--set FIELD=VALUE`: VALUE is read as JSON (numbers, true / false, null, lists),
    else kept as text."""
    from .conversion.upcycle import settable_fields

    field, equals, value = text.partition("=")
    field = field.strip()
    if not equals or field not in settable_fields():
        raise argparse.ArgumentTypeError(
            f"expected FIELD=VALUE with FIELD one of {', '.join(settable_fields())}; got {text!r}"
        )
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="accept .bin (pickle) weights, loaded with weights_only=True"
    )
    parser.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB)")


def add_upcycle_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "upcycle",
        help="dense causal LM / dense LLaVA -> MoE checkpoint (experts = copies of the dense FFN)",
        description="Upcycle a dense causal LM (Qwen2, Qwen3, StableLM, Llama, Mistral) or a dense transformers "
        "LLaVA into an hf-dare MoE checkpoint: each MoE layer's experts are exact copies of the dense FFN and "
        "the router is new, so the result computes what the dense model did until it is trained.",
    )
    parser.add_argument("src", help="dense checkpoint: local folder or Hub id")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--experts", type=int, default=4, help="experts per MoE layer (default 4)")
    parser.add_argument(
        "--router",
        type=_router,
        default="dare",
        help=f"router of the MoE layers: {', '.join(ROUTERS)} (default dare), or one per MoE layer: "
        "0:top_k,2:dare,...",
    )
    _add_list_option(
        parser,
        "--router-layers",
        _layer,
        "layer indices or ranges",
        "only these MoE layers use --router, the others --other-router: indices and inclusive ranges, e.g. 2-26 "
        "(the MoE layers from 2 to 26) or 2 4 6 or 2,4,6",
    )
    parser.add_argument(
        "--other-router",
        choices=ROUTERS,
        default="top_k",
        help="router of the MoE layers outside --router-layers (default top_k)",
    )
    _add_list_option(
        parser, "--moe-layers", int, "integers", "e.g. 0 2 4 or 0,2,4 (default: every other layer from 0)"
    )
    parser.add_argument(
        "--difficulty-proxy",
        choices=("nll", "random", "router_entropy"),
        default="nll",
        help="DARE's difficulty signal: the predictor of the next-token NLL (default), a fixed pseudo-random "
        "signal, or the router's entropy (the DARE paper's Table 4 ablation)",
    )
    _add_list_option(
        parser, "--target-distribution", float, "numbers", "DARE's Pi, e.g. 0.6 0.3 0.09 0.01 or 0.6,0.3,0.09,0.01"
    )
    parser.add_argument("--top-k", type=int, default=2, help="experts per token for top_k / ltdr (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new routers")
    parser.add_argument(
        "--drop-upcycling",
        type=float,
        default=0.0,
        metavar="R",
        help="Drop-Upcycling: each expert redraws a random fraction R of its intermediate channels from the dense "
        "weights' statistics (default 0: exact copies, the dense model's function)",
    )
    parser.add_argument(
        "--measure-gap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare the upcycled model's logits with the dense model's on a probe and state the gap in the model "
        "card (default: for models up to 20M parameters; it holds both models in memory)",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        type=_setting,
        default=[],
        metavar="FIELD=VALUE",
        help="any other MoE config field, repeatable: e.g. --set top_p_threshold=0.4 --set remoe_target_sparsity=0.6 "
        "(VALUE read as JSON, else text; the config checks it)",
    )
    _add_output_options(parser)
    parser.set_defaults(run=_run_upcycle)


def _run_upcycle(args) -> str:
    from .conversion import upcycle

    return upcycle(
        args.src,
        args.out,
        num_experts=args.experts,
        router=args.router,
        moe_layers=args.moe_layers,
        target_distribution=args.target_distribution,
        top_k=args.top_k,
        seed=args.seed,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        max_shard_size=args.max_shard_size,
        router_layers=args.router_layers,
        other_router=args.other_router,
        difficulty_proxy=args.difficulty_proxy,
        measure_gap=args.measure_gap,
        drop_upcycling=args.drop_upcycling,
        **dict(args.settings),
    )


def add_build_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "build",
        help="causal LM + CLIP/SigLIP -> dense transformers LLaVA (stage-1 starting point)",
        description="Build a dense LlavaForConditionalGeneration from a causal LM and a CLIP / SigLIP vision "
        "model, with a new 2-layer GELU projector and a LlavaProcessor.",
    )
    parser.add_argument("--llm", required=True, help="causal LM: local folder or Hub id")
    parser.add_argument("--vision", required=True, help="CLIP / SigLIP model (full or vision-only)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--image-token", default="<image>")
    parser.add_argument("--vision-feature-layer", type=int, default=-2)
    parser.add_argument(
        "--vision-feature-select-strategy",
        choices=("default", "full"),
        default=None,
        help="default: drop the first (CLS) token; full: keep every token (default: 'default' for CLIP, "
        "'full' for SigLIP, which has no CLS token)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the new projector")
    _add_output_options(parser)
    parser.set_defaults(run=_run_build)


def _run_build(args) -> str:
    from .conversion import build_llava

    return build_llava(
        args.llm,
        args.vision,
        args.out,
        image_token=args.image_token,
        vision_feature_layer=args.vision_feature_layer,
        vision_feature_select_strategy=args.vision_feature_select_strategy,
        seed=args.seed,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        max_shard_size=args.max_shard_size,
    )


def add_import_moellava_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-moellava",
        help="original (DeepSpeed) MoE-LLaVA checkpoint -> hf-dare MoE-LLaVA with the top_k router",
        description="Import an original MoE-LLaVA checkpoint (StableLM, Qwen, Qwen1.5 decoders) so it runs "
        "without DeepSpeed. The top_k router keeps the original's DeepSpeed gating options for training (Gumbel-"
        "sampled 2nd expert, capacity factors, top-1 balancing loss summed over layers); inference picks the 2nd "
        "expert deterministically.",
    )
    parser.add_argument("src", help="original MoE-LLaVA checkpoint: local folder or Hub id")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--vision", default=None, help="CLIP / SigLIP tower (default: the config's mm_image_tower)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder / Hub id (default: SRC)")
    parser.add_argument("--image-token", default="<image>")
    _add_output_options(parser)
    parser.set_defaults(run=_run_import_moellava)


def _run_import_moellava(args) -> str:
    from .conversion import import_moellava

    return import_moellava(
        args.src,
        args.out,
        vision=args.vision,
        tokenizer=args.tokenizer,
        image_token=args.image_token,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        max_shard_size=args.max_shard_size,
    )


def add_report_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="evaluate a saved MoE-LLaVA on LLaVA-format VQA data and plot its routing",
        description="Evaluate MODEL_DIR (model + processor) on DATA (LLaVA-format JSON) and write evaluation.json "
        "and plots: Avg K per layer and per modality, expert load per layer, predicted vs true difficulty (DARE), "
        "accuracy by difficulty.",
    )
    parser.add_argument("model_dir", help="saved MoE-LLaVA folder (with its processor)")
    parser.add_argument("data", help="LLaVA-format JSON with reference answers as the last 'gpt' turn")
    parser.add_argument("--images", default=None, help="image folder the JSON's paths are relative to")
    parser.add_argument("--out", default=None, help="output folder (default: MODEL_DIR/report)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.set_defaults(run=_run_report)


def _run_report(args) -> str:
    from pathlib import Path

    from .evaluation.report import report

    out = args.out or str(Path(args.model_dir) / "report")
    report(args.model_dir, args.data, args.images, out, args.batch_size, args.max_new_tokens)
    return out


def add_calibrate_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="dial a trained MoE model's compute (Avg K) on calibration data, without training",
        description="Set the routing of a trained MoE checkpoint so that it uses --avg-k experts per token on "
        "average (or the shares --target-distribution of tokens using 1..M experts) on DATA, and write it to OUT "
        "(with the tokenizer / processor files). DARE: each layer's thresholds become quantiles of its own "
        "predictions; Top-p: p by bisection (--avg-k only); Top-K: k (an integer --avg-k). LTDR, ReMoE, DynMoE and "
        "MoE++ have no dial. DATA: LLaVA-format JSON / JSONL (with --images) for an MoE-LLaVA, a text file (one "
        "sample per line) or JSON lines with a 'text' field for a causal LM.",
    )
    parser.add_argument("model_dir", help="trained hf-dare MoE checkpoint (with its tokenizer or processor)")
    parser.add_argument("data", help="calibration data (see above)")
    parser.add_argument("out", help="output folder")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--avg-k", type=float, default=None, help="experts per token on average, in 1..M")
    _add_list_option(
        target,
        "--target-distribution",
        float,
        "numbers",
        "shares of tokens using 1..M experts (DARE), e.g. 0.6 0.3 0.09 0.01 or 0.6,0.3,0.09,0.01 (space-separated: "
        "after OUT)",
    )
    parser.add_argument("--images", default=None, help="image folder the LLaVA JSON's paths are relative to")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None, help="use the first N samples (default: all)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per text sample (causal LM)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(run=_run_calibrate)


def _run_calibrate(args) -> str:
    from .calibration import calibrate_checkpoint

    return calibrate_checkpoint(
        args.model_dir,
        args.data,
        args.out,
        avg_k=args.avg_k,
        target_distribution=args.target_distribution,
        images=args.images,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        max_length=args.max_length,
        overwrite=args.overwrite,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-dare", description="hf-dare: sparse MoE vision-language models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_upcycle_command(subparsers)
    add_build_command(subparsers)
    add_import_moellava_command(subparsers)
    add_report_command(subparsers)
    add_calibrate_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `hf-dare` command; returns the exit status: 0 on success, 1 when the input cannot be used (a bad
    value, a missing path, a refused checkpoint: `hf_dare.errors.USER_ERRORS`), with the reason on one line.
    Any other error is a bug: it propagates with its traceback."""
    args = build_parser().parse_args(argv)
    from .errors import USER_ERRORS

    try:
        out = args.run(args)
    except USER_ERRORS as error:
        message = " ".join(str(error).split())
        print(f"hf-dare {args.command}: error: {message}", file=sys.stderr)
        return 1
    print(f"hf-dare {args.command}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
