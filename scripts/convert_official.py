"""Convert an official DINO or iBOT PyTorch checkpoint (`.pth`) to protodino's safetensors format.

Layouts it understands (anything else is refused, naming what it found):

* the full DINO checkpoint that `main_dino.py` saves every epoch: a dict with `student` and
  `teacher` (state dicts, the student's with DDP's `module.` prefix), `dino_loss` (its `center`
  buffer), and `optimizer`, `epoch`, `args`, `fp16_scaler`;
* the full iBOT checkpoint of `main_ibot.py`: the same with `ibot_loss` (buffers `center` for
  the [CLS] token and `center2` for the patch tokens) in place of `dino_loss`;
* a bare state dict (tensor names to tensors, possibly wrapped as `{"state_dict": ...}` or
  `{"model": ...}`), such as the backbone+head or backbone-only weights of teacher-only
  releases; `--prefix` says whose it is (`teacher`, `student`, or e.g. `teacher.backbone` for a
  backbone whose names lack `backbone.`).

What the output holds:

* `student.<official name>` and `teacher.<official name>` for every tensor of the two state
  dicts, with a leading DDP `module.` removed (`module.head.last_layer.weight_v` becomes
  `student.head.last_layer.weight_v`); weights of the newer `parametrizations` form of weight
  normalisation are renamed to the classic `weight_g` / `weight_v` names the official code uses;
* `dino_loss.center` (DINO's `dino_loss.center`, iBOT's `ibot_loss.center`) and, for iBOT,
  `ibot_loss.center2`;
* one metadata entry, `official`: JSON with the layout, the epoch, the training arguments
  (`args`, as a JSON object) and which entries were dropped (the optimiser state, whose
  parameters the official format identifies by position only, and the fp16 scaler).

Every tensor keeps its dtype and shape. After writing, the file is read back and compared with
what was meant to be written, tensor by tensor.

Checkpoints are loaded with `torch.load(weights_only=True)` (plus `argparse.Namespace`, which the
official checkpoints use for `args`); `--allow-pickle` loads arbitrary pickles, for trusted files
that need it.

Run it with the Python reference environment: `cargo xtask convert IN OUT [flags]`.
"""
import argparse
import json
import os
import sys
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file

METADATA_KEY = "official"
METADATA_FORMAT = "protodino-official/1"

# Top-level entries of the full checkpoints, besides the networks and the loss.
CARRIED_ENTRIES = {"epoch", "args"}
DROPPED_ENTRIES = {"optimizer", "fp16_scaler"}
NETWORKS = ("student", "teacher")
STATE_DICT_WRAPPERS = ("state_dict", "model")


class ConversionError(Exception):
    """A checkpoint that this converter does not understand, or a failed write."""


def load_checkpoint(path, allow_pickle=False):
    """The unpickled object of an official `.pth` file, on the CPU."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError with its reason
        raise ConversionError(
            f"{path}: cannot load it with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); if you trust the file, rerun with "
            "--allow-pickle"
        ) from e


def describe(obj):
    """A short description of the top level of an unpickled object, for error messages."""
    if isinstance(obj, Mapping):
        parts = [f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:12]]
        more = f", … ({len(obj)} entries)" if len(obj) > 12 else ""
        return "{" + ", ".join(parts) + more + "}"
    return type(obj).__name__


def is_state_dict(obj):
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    )


def canonical_tensor_name(name):
    """The official name of a state-dict entry: without DDP's leading `module.`, and with the
    `parametrizations.weight.original0/1` of `torch.nn.utils.parametrizations.weight_norm`
    renamed to the classic `weight_g` / `weight_v`."""
    if name.startswith("module."):
        name = name[len("module."):]
    for suffix, classic in (
        ("parametrizations.weight.original0", "weight_g"),
        ("parametrizations.weight.original1", "weight_v"),
    ):
        if name == suffix or name.endswith("." + suffix):
            name = name[: len(name) - len(suffix)] + classic
    return name


def network_tensors(state, prefix, what):
    """`prefix.<official name>` → tensor for every entry of a state dict."""
    if not is_state_dict(state):
        raise ConversionError(
            f"{what} is not a state dict (names to tensors): {describe(state)}"
        )
    out = {}
    for name, tensor in state.items():
        target = f"{prefix}.{canonical_tensor_name(name)}"
        if target in out:
            raise ConversionError(
                f"{what}: `{name}` and another entry both become `{target}` (given with and "
                "without a `module.` prefix?)"
            )
        out[target] = tensor
    return out


def args_json(args):
    """The training arguments as a JSON-serialisable dict (`argparse.Namespace` or a dict)."""
    if args is None:
        return None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        return {"repr": repr(args)}
    return json.loads(json.dumps(dict(args), default=str))


def plain_number(x):
    if torch.is_tensor(x) and x.numel() == 1:
        return x.item()
    return x if isinstance(x, (int, float)) or x is None else str(x)


def loss_buffers(loss, what, required):
    """The buffers of a saved loss module, exactly `required` (names to tensors)."""
    if not isinstance(loss, Mapping):
        raise ConversionError(f"{what} is not a state dict: {describe(loss)}")
    missing = [b for b in required if b not in loss]
    unknown = sorted(set(loss) - set(required))
    if missing or unknown:
        raise ConversionError(
            f"{what} should hold exactly {list(required)}; missing {missing}, unknown {unknown}"
        )
    for b in required:
        if not torch.is_tensor(loss[b]):
            raise ConversionError(f"{what}.{b} is not a tensor: {type(loss[b]).__name__}")
    return loss


def convert(obj, prefix=None, source=None):
    """(tensors, metadata) of protodino's format for an unpickled official checkpoint.

    `prefix` is required for a bare state dict and refused for a full checkpoint.
    """
    meta = {"format": METADATA_FORMAT, "source": source}
    if isinstance(obj, Mapping) and all(n in obj for n in NETWORKS):
        if prefix is not None:
            raise ConversionError(
                "--prefix is for bare state dicts; this is a full checkpoint with student "
                "and teacher"
            )
        if "ibot_loss" in obj and "dino_loss" in obj:
            raise ConversionError("the checkpoint has both `dino_loss` and `ibot_loss`")
        if "ibot_loss" in obj:
            layout, loss_key, buffers = "ibot", "ibot_loss", ("center", "center2")
        elif "dino_loss" in obj:
            layout, loss_key, buffers = "dino", "dino_loss", ("center",)
        else:
            raise ConversionError(
                "the checkpoint has `student` and `teacher` but neither `dino_loss` (DINO) nor "
                f"`ibot_loss` (iBOT): {describe(obj)}"
            )
        known = set(NETWORKS) | {loss_key} | CARRIED_ENTRIES | DROPPED_ENTRIES
        unknown = sorted(str(k) for k in obj if k not in known)
        if unknown:
            raise ConversionError(
                f"unknown top-level entries {unknown} in a {layout} checkpoint (known: "
                f"{sorted(known)}); refusing to drop them silently"
            )
        tensors = {}
        for net in NETWORKS:
            tensors.update(network_tensors(obj[net], net, f"`{net}`"))
        loss = loss_buffers(obj[loss_key], f"`{loss_key}`", buffers)
        tensors["dino_loss.center"] = loss["center"]
        if layout == "ibot":
            tensors["ibot_loss.center2"] = loss["center2"]
        meta.update(
            layout=layout,
            epoch=plain_number(obj.get("epoch")),
            args=args_json(obj.get("args")),
            dropped=sorted(k for k in obj if k in DROPPED_ENTRIES),
        )
        return tensors, meta

    state, wrapper = obj, None
    if (
        isinstance(obj, Mapping)
        and len(obj) == 1
        and next(iter(obj)) in STATE_DICT_WRAPPERS
    ):
        wrapper = next(iter(obj))
        state = obj[wrapper]
    if is_state_dict(state):
        if prefix is None:
            raise ConversionError(
                f"a bare state dict ({len(state)} tensors, e.g. `{next(iter(state))}`): say "
                "whose it is with --prefix teacher (or student; teacher.backbone for a "
                "backbone whose names lack `backbone.`)"
            )
        check_prefix(prefix)
        meta.update(layout="state_dict", prefix=prefix, wrapper=wrapper, epoch=None, args=None,
                    dropped=[])
        return network_tensors(state, prefix, "the state dict"), meta

    raise ConversionError(
        "unknown layout: neither a full DINO/iBOT checkpoint (`student`, `teacher`, "
        "`dino_loss` or `ibot_loss`, ...) nor a state dict of tensors; found "
        + describe(obj)
    )


def check_prefix(prefix):
    parts = prefix.split(".")
    if parts[0] not in NETWORKS or any(not p or not p.isidentifier() for p in parts):
        raise ConversionError(
            f"--prefix {prefix!r}: must be `teacher` or `student`, optionally followed by "
            "dotted module names (e.g. `teacher.backbone`)"
        )


def write(path, tensors, meta):
    """Write the safetensors file atomically (temporary file, then rename)."""
    # Own contiguous CPU copies: safetensors refuses tensors that share storage (a shared
    # iBOT head saves the same layer as `last_layer` and `last_layer2`).
    owned = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(owned, tmp, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ConversionError(f"{path}: cannot write it: {e}") from e


def verify(path, tensors):
    """Read the written file back: the same names, dtypes, shapes and values."""
    back = load_file(path)
    if set(back) != set(tensors):
        raise ConversionError(
            f"{path}: read back {len(back)} tensors, wrote {len(tensors)}: missing "
            f"{sorted(set(tensors) - set(back))}, extra {sorted(set(back) - set(tensors))}"
        )
    for name, t in tensors.items():
        b = back[name]
        t = t.detach().cpu()
        same = b.dtype == t.dtype and b.shape == t.shape
        if same and t.is_floating_point():
            same = torch.allclose(b, t, rtol=0, atol=0, equal_nan=True)
        elif same:
            same = torch.equal(b, t)
        if not same:
            raise ConversionError(f"{path}: `{name}` did not survive the round trip")


def summary(tensors, meta):
    groups = {}
    for name in tensors:
        root = name.split(".")[0]
        groups[root] = groups.get(root, 0) + 1
    heads = sorted(n for n in tensors if n.endswith(".weight_v") and "last_layer" in n)
    lines = [
        f"layout {meta['layout']}: "
        + ", ".join(f"{root}.* {n}" for root, n in sorted(groups.items()))
    ]
    for n in heads:
        lines.append(f"  prototype layer {n} {list(tensors[n].shape)}")
    if meta.get("dropped"):
        lines.append(f"  dropped: {', '.join(meta['dropped'])}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="convert_official.py",
        description="Convert an official DINO / iBOT .pth checkpoint (full checkpoint or bare "
        "state dict) to protodino's safetensors format: student.<name>, teacher.<name>, "
        "dino_loss.center, ibot_loss.center2, training arguments as metadata JSON.",
    )
    parser.add_argument("input", help="official checkpoint (.pth)")
    parser.add_argument("output", help="protodino checkpoint to write (.safetensors)")
    parser.add_argument(
        "--prefix",
        help="for a bare state dict: whose it is, `teacher` or `student` (or e.g. "
        "`teacher.backbone` for backbone-only weights)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load with weights_only=False (arbitrary code in the file runs: trusted files only)",
    )
    args = parser.parse_args(argv)
    try:
        obj = load_checkpoint(args.input, args.allow_pickle)
        tensors, meta = convert(obj, args.prefix, os.path.basename(args.input))
        write(args.output, tensors, meta)
        verify(args.output, tensors)
    except ConversionError as e:
        print(f"convert_official.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {len(tensors)} tensors, checked by reading them back")
    print(summary(tensors, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
