"""A deterministic corpus of varied prompts for tokenizer tests: ordinary Stable Diffusion prompts,
A1111 weighting syntax, numbers, URLs, many scripts, emoji, odd whitespace, contractions, literal
special tokens, control characters, character soup, and prompts long enough to be truncated.

Characters are taken from blocks assigned by Unicode 14 or earlier, so that every Unicode
database in play (Python's, the regex module's, the tokenizers library's) classifies them alike.
"""

from __future__ import annotations

import random

SUBJECTS = [
    "a photo of a cat", "portrait of an old man", "a castle on a hill", "a red sports car",
    "an astronaut riding a horse", "a bowl of ramen", "the Eiffel Tower at night", "a cyberpunk city",
    "a watercolor fox", "Mount Fuji in spring", "a robot reading a book", "two dogs playing in snow",
    "A Lighthouse In A Storm", "an owl, wings spread", "a medieval knight", "the surface of Mars",
]
STYLES = [
    "highly detailed", "octane render", "trending on artstation", "oil painting", "by Greg Rutkowski",
    "studio lighting", "bokeh", "cinematic", "ultra realistic", "concept art", "digital art",
    "masterpiece", "best quality", "HDR", "unreal engine 5", "volumetric lighting", "sharp focus",
]
WEIGHTS = [
    "({w}:1.3)", "(({w}))", "[{w}]", "[[{w}]]", "{{{w}}}", "({w}:0.7)", "[{w}:{v}:0.5]", "[{w}|{v}]",
    "\\({w}\\)", "<lora:{w}:0.8>", "({w}, {v}:1.15)", "{w} BREAK {v}", "{w} AND {v}", "({w}:.5)",
    "embedding:{w}", "(({w}:1.2)), [{v}]",
]
NUMBERS = [
    "8k", "4K UHD", "1920x1080", "3.14159", "1,000,000", "#FF00aa", "50%", "f/1.8", "35mm",
    "ISO 100", "1/250s", "-12.5°C", "2024-05-06", "v1.5", "0.0001", "99 bottles", "1st 2nd 3rd",
    "$19.99", "+42", "7:30pm", "10^6", "x2", "3d", "1e-4", "000123",
]
URLS = [
    "https://example.com/a?b=c&d=e#frag", "http://www.EXAMPLE.org/Path/To/Image.PNG",
    "user.name+tag@mail.example.co.uk", "C:\\Users\\me\\Pictures\\cat.jpg", "/usr/share/images/x_y-z.webp",
    "ftp://files.example.net/pub/", "www.site.com/~user/index.html", "@someone #hashtag",
]
WORDS_BY_SCRIPT = [
    "café crème brûlée", "naïve résumé", "Ñandú piñata", "Straße ẞ groß", "Ærøskøbing", "Łódź Kraków",
    "ÉCOLE ÀÉÎÕÜ", "ΟΔΟΣ σοφία Σίσυφος", "Москва ЁЛКА ёжик", "Ελληνικά", "עברית שלום", "العربية مرحبا",
    "हिन्दी नमस्ते", "ภาษาไทย สวัสดี", "中文 猫 山水画 龍", "日本語 ねこ カタカナ ｶﾀｶﾅ", "한국어 고양이",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ﬁne ﬂow ﬀ", "İstanbul ıi", "ǅemal ǈ ǋ", "Ω Å K", "𝐀𝐁𝐂 𝒳𝓎𝓏 𝔘𝔫𝔦",
    "Tiếng Việt", "ქართული", "Հայերեն", "ᏣᎳᎩ", "ⲀⲂⲄ", "ߒߞߏ", "ᚠᚢᚦ",
]
COMBINING = [
    "e\u0301", "E\u0301", "a\u0308", "n\u0303", "A\u030a", "o\u0302\u0323", "\u1100\u1161\u11a8",
    "\u0915\u094d\u0937", "i\u0307", "z\u0335\u0336", "\u0301alone", "c\u0327a",
]
EMOJI = [
    "😀", "🐱", "🔥🔥🔥", "❤️", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🇺🇸🇫🇷", "1️⃣", "#️⃣", "©️", "☀",
    "🧑‍🚀", "✨", "🎨🖌️", "🥲", "🦊", "🌸", "⭐️",
]
NUMERIC_SYMBOLS = ["½ ¾ ⅓", "² ³ ¹", "Ⅻ ⅻ Ⅳ", "① ② ⑳", "٣٤٥", "१२३", "๑๒๓", "〇 一 二 三", "𝟙𝟚𝟛", "⁴⁵₆₇"]
SYMBOLS = [
    "©®™", "★☆♥♦", "→⇒←", "€£¥₹", "“quotes”", "‘single’", "«guillemets»", "— – -", "…", "~~~", "^_^",
    ">_<", "¯\\_(ツ)_/¯", "(╯°□°)╯︵ ┻━┻", "!!!", "???", "?!", "¡¿", "***", "@@", "||", "::", ";;",
    "<>", "&amp; &lt;b&gt;", "&#39;", "\\n", "%%", "°", "±×÷", "∑∫√∞", "§¶", "•·", "\"double\"",
]
WHITESPACE = [
    "\t", "\n", "\r\n", "  ", "     ", "\u00a0", "\u3000", "\u2028", "\u2029", "\u2003", "\u202f",
    "\x0b", "\x0c", "\x85", "\u1680", "\u205f",
    # not whitespace for the tokenizer: zero-width space/joiners, BOM, Mongolian vowel separator,
    # and the ASCII separators \x1c-\x1f (which Python's str.isspace() does call whitespace)
    "\u200b", "\u200c", "\u200d", "\ufeff", "\u180e", "\x1c", "\x1d", "\x1e", "\x1f",
]
CONTRACTIONS = [
    "it's", "IT'S", "we'll", "they're", "I'd", "you've", "I'm", "can't", "y'all", "rock'n'roll",
    "'s", "''s", "'''", "o'clock", "don't!", "it’s", "l'amour", "'tis", "the dog's bone", "'LL", "'re'd",
]
SPECIAL = [
    "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext|", "|endoftext|>", "<|EndOfText|>",
    "a<|endoftext|>b<|startoftext|>c", "<|endoftext|><|endoftext|>", " <|startoftext|> ", "<| endoftext |>",
]
CONTROL = ["\x00", "\x01", "\x07", "\x1b[31m", "\x7f", "\x80", "\x9f", "\ud7ff", "\ue000", "\U000f0000"]
EDGE = ["", " ", "\n", "a", "A", "!", ".", "1", "11", "é", "猫", "🐱", "'", "''", "\u0301"]


def _pick(rng: random.Random, pool: list[str], k: int) -> list[str]:
    return [rng.choice(pool) for _ in range(k)]


def sd_prompt(rng: random.Random) -> str:
    parts = [rng.choice(SUBJECTS), *_pick(rng, STYLES, rng.randint(0, 6))]
    return rng.choice([", ", ",", " , ", " "]).join(parts)


def weighted_prompt(rng: random.Random) -> str:
    words = [w for s in SUBJECTS + STYLES for w in s.split()]
    n = rng.randint(1, 5)
    parts = [rng.choice(WEIGHTS).format(w=rng.choice(words), v=rng.choice(words)) for _ in range(n)]
    return ", ".join([rng.choice(SUBJECTS), *parts])


def mixed_prompt(rng: random.Random, pools: list[list[str]]) -> str:
    pieces = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 8))]
    seps = ["", " ", ", ", "\t", rng.choice(WHITESPACE)]
    return "".join(p + rng.choice(seps) for p in pieces)


def char_soup(rng: random.Random) -> str:
    alphabet = "".join(
        WORDS_BY_SCRIPT + COMBINING + EMOJI + NUMERIC_SYMBOLS + SYMBOLS + WHITESPACE + CONTRACTIONS + CONTROL
    ) + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 '"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))


def cjk_soup(rng: random.Random) -> str:
    ranges = [(0x4E00, 0x9FFF), (0x3041, 0x3096), (0x30A1, 0x30FA), (0xAC00, 0xD7A3), (0x0400, 0x04FF)]
    chars = [chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 30))]
    return "".join(c + (" " if rng.random() < 0.2 else "") for c in chars)


def long_prompt(rng: random.Random) -> str:
    pools = [SUBJECTS, STYLES, NUMBERS, WORDS_BY_SCRIPT, EMOJI, SYMBOLS, CONTRACTIONS]
    return ", ".join(mixed_prompt(rng, pools) for _ in range(rng.randint(15, 60)))


def prompt_corpus(seed: int = 0) -> list[str]:
    """About 1,400 prompts, the same on every run."""
    rng = random.Random(seed)
    pools = [SUBJECTS, STYLES, NUMBERS, URLS, WORDS_BY_SCRIPT, COMBINING, EMOJI, NUMERIC_SYMBOLS,
             SYMBOLS, WHITESPACE, CONTRACTIONS, SPECIAL, CONTROL, EDGE]
    corpus = [p for pool in pools for p in pool]  # every listed item on its own
    corpus += [sd_prompt(rng) for _ in range(200)]
    corpus += [weighted_prompt(rng) for _ in range(150)]
    corpus += [mixed_prompt(rng, pools) for _ in range(300)]
    corpus += [char_soup(rng) for _ in range(200)]
    corpus += [cjk_soup(rng) for _ in range(80)]
    corpus += [long_prompt(rng) for _ in range(80)]
    for _ in range(60):  # shouted, wrapped in odd whitespace
        corpus.append(3 * rng.choice(WHITESPACE) + sd_prompt(rng).upper() + rng.choice(WHITESPACE))
    return corpus
