"""lmms-eval model `hf_dare`: MoE-LLaVA checkpoints under lmms-eval (MME, GQA, POPE, ... and local tasks).

lmms-eval's generic `huggingface` model cannot run them: it picks `AutoModel` for any model type outside
transformers' own mappings (and, in 0.7.x, for every model type: it looks a type name up in a mapping keyed by
config classes), and a checkpoint's `auto_map["AutoModel"]` is the base `MoELlavaModel`, which has no
`generate` (it stays so: vLLM's transformers backend needs it). This model loads
`AutoModelForImageTextToText` + `AutoProcessor` and answers greedily from the very inputs that
`hf_dare.evaluation.evaluate_vqa` builds (`messages_batch`: the processor's chat template with the generation
prompt, no added special tokens, left padding), so both give the same answers.

hf-dare declares it in the `lmms_eval.models` entry-point group (lmms-eval >= 0.7), so once both are installed:

    python -m lmms_eval --model hf_dare --model_args pretrained=DIR --tasks TASK --batch_size 16

`model_args`: `pretrained`, `device` (default cuda if available), `dtype` (default "auto": the checkpoint's),
`batch_size`, `trust_remote_code` (default False: hf_dare's installed classes; True runs the code saved with
the checkpoint), `attn_implementation`, `experts_implementation`, `max_new_tokens` (used when the task sets
none; default 128).

`python -m hf_dare.integrations.lmms_eval DATA.json --images DIR --out TASKS/NAME` turns LLaVA-format data
(single-turn, images before the question, as `hf-dare report` reads) into an lmms-eval task folder from the
template in `lmms_eval_tasks/digits_vqa/`, for `--include_path TASKS --tasks NAME`.

Importing this module imports lmms_eval; `hf_dare` itself never imports it.
"""

import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages
from loguru import logger
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_dare.data import conversation_to_messages, load_image, load_llava_dataset
from hf_dare.evaluation import generate_from_inputs, messages_batch

MODEL_NAME = "hf_dare"
TASK_TEMPLATE = Path(__file__).with_name("lmms_eval_tasks") / "digits_vqa"


def model_manifests() -> list[ModelManifest]:
    """The `lmms_eval.models` entry point: `--model hf_dare` (alias `hf_dare_moe_llava`)."""
    return [
        ModelManifest(
            model_id=MODEL_NAME,
            chat_class_path=f"{__name__}.HfDareMoELlava",
            aliases=("hf_dare_moe_llava",),
        )
    ]


def _torch_dtype(dtype):
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, str(dtype).removeprefix("torch."))


class HfDareMoELlava(lmms):
    """An MoE-LLaVA (any `AutoModelForImageTextToText` with a chat-template processor) as an lmms-eval chat
    model: `generate_until` only (no log-likelihoods, no video or audio)."""

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = "auto",
        batch_size: int | str = 1,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        experts_implementation: str | None = None,
        max_new_tokens: int = 128,
        **kwargs,
    ) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)  # lmms-eval passes it through; batches here have a fixed size
        if kwargs:
            raise ValueError(f"hf_dare: unknown model_args {sorted(kwargs)}")
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # data parallel: lmms-eval shards the documents by rank
            self._device = self.accelerator.device
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        load_kwargs = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code}
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        if experts_implementation:
            load_kwargs["experts_implementation"] = experts_implementation
        self._model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.pretrained = pretrained
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def model(self):
        return self._model

    @property
    def config(self):
        return self._model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @staticmethod
    def _to_hf_dare(messages: list) -> tuple[list[dict], list]:
        """lmms-eval chat messages -> (chat messages with `{"type": "image"}` parts, the images in order)."""
        conversation, images = [], []
        for message in ChatMessages(messages=messages).messages:
            content = []
            for part in message.content:
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                elif part.type == "image":
                    content.append({"type": "image"})
                    images.append(load_image(part.url))
                else:
                    raise ValueError(f"hf_dare: {part.type} inputs are not supported (images and text only)")
            conversation.append({"role": message.role, "content": content})
        return conversation, images

    @torch.no_grad()
    def _generate(self, inputs, gen_kwargs: dict) -> list[str]:
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if not gen_kwargs.get("do_sample", False) and temperature == 0.0 and int(gen_kwargs.get("num_beams", 1)) == 1:
            return generate_from_inputs(self.model, self.processor, inputs, max_new_tokens)  # = evaluate_vqa
        generated = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0.0,
            temperature=temperature if temperature > 0.0 else None,
            top_p=gen_kwargs.get("top_p"),
            num_beams=int(gen_kwargs.get("num_beams", 1)),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        # Documents in their dataset order and batched in it, as `evaluate_vqa` batches its dataset; requests
        # with different generation settings go in different batches.
        groups = defaultdict(list)
        for position, request in enumerate(requests):
            _, _, gen_kwargs, doc_id, task, split = request.args
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append((task, split, doc_id, position))
        results: list[GenerationResult | None] = [None] * len(requests)
        for group in groups.values():
            group.sort()
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                conversations, images = [], []
                for task, split, doc_id, position in batch:
                    doc_to_messages = requests[position].args[1]
                    conversation, doc_images = self._to_hf_dare(doc_to_messages(self.task_dict[task][split][doc_id]))
                    conversations.append(conversation)
                    images += doc_images
                gen_kwargs = requests[batch[0][3]].args[2]
                inputs = messages_batch(self.processor, conversations, images, self.device)
                answers = self._generate(inputs, gen_kwargs)
                for (_, _, _, position), answer in zip(batch, answers, strict=True):
                    for stop in gen_kwargs.get("until") or []:
                        if stop:
                            answer = answer.split(stop)[0]
                    tokens = len(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
                    results[position] = GenerationResult(text=answer, token_counts=TokenCounts(output_tokens=tokens))
                    self.cache_hook.add_partial("generate_until", (requests[position].args[0], gen_kwargs), answer)
                logger.debug(f"hf_dare: answered {start + len(batch)} / {len(group)}")
        return results

    def loglikelihood(self, requests):
        raise NotImplementedError("hf_dare: log-likelihood requests are not supported; use generation tasks")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("hf_dare: multi-round generation is not supported")


def write_task(
    data: str | Path,
    out_dir: str | Path,
    image_folder: str | Path | None = None,
    task: str | None = None,
    limit: int | None = None,
) -> Path:
    """An lmms-eval task folder from LLaVA-format `data` (as `hf-dare report` reads it): the template's yaml
    (task name = `task`, default the folder's name) and `utils.py`, `data/test.jsonl` (`id`, `question`,
    `answer`, `images`) and the images it uses under `data/images/`. Each sample must be one question with its
    images before the text (the user turn lmms-eval builds: images, then `doc_to_text`) and one answer."""
    out_dir = Path(out_dir)
    task = task or out_dir.name
    dataset = load_llava_dataset(data, image_folder)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    (out_dir / "data" / "images").mkdir(parents=True, exist_ok=True)
    rows, copied = [], {}
    for sample in dataset:
        turns = sample["conversations"]
        if [turn["from"] for turn in turns] != ["human", "gpt"]:
            raise ValueError(f"sample {sample['id']!r}: expected one question and one answer, got {len(turns)} turns")
        content = conversation_to_messages(turns[:1])[0]["content"]
        n_images = len(sample["images"])
        if [part["type"] for part in content] != ["image"] * n_images + ["text"]:
            raise ValueError(f"sample {sample['id']!r}: lmms-eval puts the images before the question text")
        names = []
        for path in sample["images"]:
            if path not in copied:
                copied[path] = f"images/{len(copied)}_{Path(path).name}"
                shutil.copyfile(path, out_dir / "data" / copied[path])
            names.append(copied[path])
        rows.append(
            {"id": sample["id"], "question": content[-1]["text"], "answer": turns[1]["value"], "images": names}
        )
    (out_dir / "data" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    shutil.copyfile(TASK_TEMPLATE / "utils.py", out_dir / "utils.py")
    template = (TASK_TEMPLATE / "digits_vqa.yaml").read_text()
    (out_dir / f"{task}.yaml").write_text(template.replace("task: digits_vqa\n", f"task: {task}\n", 1))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_dare.integrations.lmms_eval",
        description="Write an lmms-eval task folder from LLaVA-format VQA data (then --include_path its parent).",
    )
    parser.add_argument("data", help="LLaVA-format .json / .jsonl (reference answer = the 'gpt' turn)")
    parser.add_argument("--images", help="folder the samples' image paths are relative to")
    parser.add_argument("--out", required=True, help="task folder to write (its name is the task name)")
    parser.add_argument("--task", help="task name (default: the folder's name)")
    parser.add_argument("--limit", type=int, help="keep the first N samples")
    args = parser.parse_args(argv)
    out = write_task(args.data, args.out, args.images, task=args.task, limit=args.limit)
    print(f"wrote {out}: --include_path {out.parent} --tasks {args.task or out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
