"""Why a `shapes` model misses position prompts: where it puts the objects, and whether the
relation word changes its predictions at all.

    python benchmarks/shapes_position.py                                  # the embedded model
    python benchmarks/shapes_position.py --model runs/a/model.safetensors runs/b/model.safetensors
    python benchmarks/shapes_position.py --parts snr                      # data only, no model

Five parts, each printed as a markdown table:

- ``directions``: canonical position prompts (``evaluation_prompts``, seed 0), one image each at
  the model's recommended settings; for every image that holds the two objects asked for, the
  direction in which the first stands from the second (the analyzer's rule: the dominant axis
  of the centroids' offset), against the direction asked for. A model that reads the relation
  fills the diagonal; one that ignores it spreads each row evenly.
- ``flip``: real position scenes are encoded, noised to timestep t and denoised twice, with the
  scene's canonical prompt and with its relation reversed ("left of" <-> "right of", "above" <->
  "below"). ``x0 loss`` is the mean squared error of the predicted clean latents for each; a
  model that uses the relation does better with the true one. ``ratio`` is the size of the
  change the reversal makes to the network's output, relative to the change that dropping the
  prompt makes.
- ``pair``: "a red circle <relation> a blue square" for each relation, 48 images each with the
  same seeds; the mean offset (x, y in pixels, y down) of the red object from the blue one.
- ``probe``: whether the U-Net knows where it is: a logistic regression on its 4 x 4 middle-block
  features (pure noise in, t = 999 and 700) tells the left half of the feature map from the
  right, trained on half the positions of 64 samples and scored on the other half.
- ``snr``: from data alone, the SNR of the latents' coarse layout at each t: the variance of
  2 x 2 block means of clean latents across images, times alpha_bar, over the variance of the
  noise's block means. Above about 1 the layout can be read from x_t and the prompt no longer
  decides it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import unfog  # noqa: E402
from unfog.conditioning import encode_prompt  # noqa: E402
from unfog.datasets.shapes import ShapesConfig, make_item, render, spec_for, to_tensor  # noqa: E402
from unfog.datasets.shapes_text import INVERSE, RELATION_PHRASES, RELATIONS  # noqa: E402
from unfog.diffusion.denoiser import Denoiser  # noqa: E402
from unfog.metrics.shapes_analyzer import analyze, relation_holds  # noqa: E402
from unfog.metrics.shapes_eval import generate, prompt_set  # noqa: E402
from unfog.pipelines.latent_model import recommended_settings  # noqa: E402

TIMESTEPS = (999, 950, 900, 800, 700, 500, 300)
REVERSED = {RELATION_PHRASES[r][0]: RELATION_PHRASES[INVERSE[r]][0] for r in RELATIONS}  # canonical phrases


def direction(a, b) -> str:
    """The relation in which detected object a stands to b, by the analyzer's rule (on the
    diagonal, where two hold, the horizontal one)."""
    return next(r for r in RELATIONS if relation_holds(a, b, r))


def directions(pipe, settings: dict, n: int) -> Counter:
    specs = prompt_set(n, categories=("position",))
    images = generate(pipe, specs, **settings, progress=False)
    table = Counter()
    for image, spec in zip(images, specs):
        found = analyze(image)
        first, second = spec.objects
        a = [o for o in found if o.shape == first.shape and first.color in (None, o.color)]
        b = [o for o in found if o.shape == second.shape and second.color in (None, o.color) and all(o is not x for x in a[:1])]
        if len(found) != 2 or not a or not b:
            table[spec.relation, "objects wrong"] += 1
        else:
            table[spec.relation, direction(a[0], b[0])] += 1
    return table


def pair(pipe, settings: dict) -> list[tuple[str, int, float, float]]:
    """(relation phrase, images with both objects, mean dx, mean dy) of the red circle from the blue square."""
    rows = []
    for relation in RELATIONS:
        phrase = RELATION_PHRASES[relation][0]
        images = pipe([f"a red circle {phrase} a blue square"] * 48, **settings, seed=5, output="tensor")
        offsets = []
        for image in images:
            found = analyze(image)
            red, blue = ([o for o in found if o.color == c] for c in ("red", "blue"))
            if red and blue:
                offsets.append((red[0].cx - blue[0].cx, red[0].cy - blue[0].cy))
        d = torch.tensor(offsets).mean(0).tolist() if offsets else [float("nan")] * 2
        rows.append((phrase, len(offsets), d[0], d[1]))
    return rows


@torch.no_grad()
def probe(pipe) -> list[tuple[int, float]]:
    """(t, held-out accuracy) of a linear left/right-half probe on the middle block's features."""
    from sklearn.linear_model import LogisticRegression

    features = {}
    hook = pipe.unet.middle_block.register_forward_hook(lambda m, i, out: features.__setitem__("mid", out))
    context = encode_prompt(pipe.family, [pipe.text_encoder], pipe.tokenizer, [""] * 64, "").context
    g, size, rows = torch.Generator().manual_seed(0), pipe.default_size, []
    f = pipe.vae.config.downsample_factor
    try:
        for t in (999, 700):
            pipe.unet(torch.randn(64, pipe.unet.config.in_channels, size // f, size // f, generator=g),
                      torch.full((64,), float(t)), context)
            b, c, h, w = features["mid"].shape
            x = features["mid"].permute(0, 2, 3, 1).reshape(-1, c).float().numpy()  # (b * h * w, c)
            right = (torch.arange(w).repeat(b * h) >= w // 2).numpy()
            half = len(x) // 2
            model = LogisticRegression(max_iter=2000).fit(x[:half], right[:half])
            rows.append((t, model.score(x[half:], right[half:])))
    finally:
        hook.remove()
    return rows


def position_scenes(n: int, size: int, seed: int = 77):
    config = ShapesConfig(categories=("position",))
    return [make_item(i, size, seed, config)[0] for i in range(n)]


def reversed_text(text: str) -> str:
    for phrase, other in REVERSED.items():
        if f" {phrase} " in text:
            return text.replace(f" {phrase} ", f" {other} ")
    raise ValueError(f"no relation in {text!r}")


@torch.no_grad()
def latents(pipe, scenes) -> torch.Tensor:
    x = torch.stack([to_tensor(render(s)) for s in scenes])
    return torch.cat([pipe.vae.encode(x[i : i + 256]).mean for i in range(0, len(x), 256)]) \
        * pipe.vae.config.scaling_factor


@torch.no_grad()
def flip(pipe, n: int) -> list[tuple[int, float, float, float]]:
    """(t, x0 loss with the true prompt, with the reversed relation, output change ratio) per t."""
    scenes = position_scenes(n, pipe.default_size)
    texts = [spec_for(s).text for s in scenes]
    z0 = latents(pipe, scenes)
    true = encode_prompt(pipe.family, [pipe.text_encoder], pipe.tokenizer, texts, "")
    other = encode_prompt(pipe.family, [pipe.text_encoder], pipe.tokenizer, [reversed_text(t) for t in texts], "")
    denoise = Denoiser(pipe.unet, pipe.schedule, pipe.prediction, round_timesteps=True)  # x, sigma -> x0
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in TIMESTEPS:
        sigma = pipe.schedule.sigmas[t].float()
        x = z0 + sigma * torch.randn(z0.shape, generator=g)
        d, d_rev, d_empty = (denoise(x, sigma, context=c) for c in (true.context, other.context, true.negative_context))
        loss, loss_rev = (((out - z0) ** 2).mean().item() for out in (d, d_rev))
        # x0 = c_skip x + c_out F with one c_out per t, so this is also the ratio of the network outputs
        ratio = ((d - d_rev).flatten(1).norm(dim=1).mean() / (d - d_empty).flatten(1).norm(dim=1).mean()).item()
        rows.append((t, loss, loss_rev, ratio))
    return rows


@torch.no_grad()
def layout_snr(pipe, n: int) -> list[tuple[int, float]]:
    z0 = latents(pipe, position_scenes(n, pipe.default_size, seed=78))
    h = z0.shape[-1] // 2
    blocks = torch.nn.functional.avg_pool2d(z0, h)  # (n, C, 2, 2) means of 2 x 2 blocks
    signal = ((blocks - blocks.mean(0)) ** 2).mean().item()
    schedule = pipe.schedule
    rows = []
    for t in TIMESTEPS:
        ab = schedule.alphas_cumprod[t].item()
        rows.append((t, ab * signal / ((1 - ab) / (h * h))))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=[str(resources.files("unfog") / "weights" / "shapes.safetensors")])
    parts = ["directions", "flip", "pair", "probe", "snr"]
    p.add_argument("--parts", nargs="+", default=parts, choices=parts)
    p.add_argument("--prompts", type=int, default=100, help="position prompts drawn for 'directions'")
    p.add_argument("--scenes", type=int, default=64, help="real scenes for 'flip' (and 4x as many for 'snr')")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels for every part (default: each model's own); a model trained "
                        "at 32 px run at 64 shows whether what it learned carries over")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.model:
        pipe, settings = unfog.load(path), recommended_settings(path)
        if args.size is not None:
            pipe.native_size = args.size
        print(f"\nmodel {path} at {pipe.default_size} px; {settings}\n")
        if "directions" in args.parts:
            table = directions(pipe, settings, args.prompts)
            cols = [*RELATIONS, "objects wrong"]
            print("| asked \\ drawn | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
            for r in RELATIONS:
                print(f"| {r} | " + " | ".join(str(table[r, c]) for c in cols) + " |")
            placed = sum(table[r, c] for r in RELATIONS for c in RELATIONS)
            right = sum(table[r, r] for r in RELATIONS)
            print(f"\nin the asked relation: {right} of the {placed} images with the right objects "
                  f"({100 * right / max(1, placed):.0f}%; chance 25%)\n")
        if "flip" in args.parts:
            print("| t | x0 loss, true prompt | x0 loss, relation reversed | output change: reversed / dropped |\n"
                  "|---:|---:|---:|---:|")
            for t, loss, loss_rev, ratio in flip(pipe, args.scenes):
                print(f"| {t} | {loss:.4f} | {loss_rev:.4f} | {ratio:.3f} |")
            print()
        if "pair" in args.parts:
            print("| prompt: a red circle ... a blue square | images with both | mean dx | mean dy |\n|---|---:|---:|---:|")
            for phrase, n, dx, dy in pair(pipe, settings):
                print(f"| {phrase} | {n} | {dx:+.1f} | {dy:+.1f} |")
            print()
        if "probe" in args.parts:
            print("| t | left/right probe accuracy, 4 x 4 middle block |\n|---:|---:|")
            for t, accuracy in probe(pipe):
                print(f"| {t} | {accuracy:.3f} |")
            print()
        if "snr" in args.parts:
            print("| t | SNR of the coarse (2 x 2 block) layout |\n|---:|---:|")
            for t, s in layout_snr(pipe, 4 * args.scenes):
                print(f"| {t} | {s:.3f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
