"""T5 text embeddings for IF, computed once and cached on disk, so the 4.7B-parameter encoder never
sits beside the U-Net while training.

    python t5cache.py CONFIG [--key=value ...]    # encode every caption the config can produce

Text is prepared exactly as IF's pipelines do: lowercase + strip, T5 tokenizer padded to
`tokenizer_max_length` (77), truncated, `</s>` appended, attention mask to T5 only, and all L output
vectors kept (pad positions are not zero and the U-Net reads them). The cache is a folder:

    index.json                      encoder identity, max_length, dtype, clean_caption, dim, the shards
    shard-r<rank>-<seq>.safetensors emb [N, L, D] (bf16), lengths [N] (tokens incl. </s>; the mask
                                    is a prefix of ones), keys [N, 32] (sha256 of caption + settings)

A shard is written to a .tmp file, fsynced and renamed before the index names it, so a killed build
loses at most the shard in flight, and a re-run encodes only what is missing. Readers memory-map
the shards once and gather rows: `TextCache(dir).get(captions) -> [B, L, D]`.

train.py, sample.py and the command line all go through `prepare(cfg, captions) -> TextCache`, which takes
the folder, the T5 and every setting from the config, so each reads the cache the others wrote.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from pathlib import Path

import torch

from config import torch_dtype

IF_T5 = "DeepFloyd/IF-I-XL-v1.0"  # every IF stage was trained with its T5 v1.1 XXL (docs/if.md, section 1.1)
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                      "I32": torch.int32, "U8": torch.uint8}
BUILD_CMD = "python t5cache.py CONFIG"


def prepare_caption(text: str, clean_caption: bool = False) -> str:
    """IF's text preprocessing: lowercase and strip; with clean_caption=True, IF's heavy
    cleaning instead, applied twice as its pipelines do (an optional install: `pip install beautifulsoup4
    ftfy`). The result is what T5 reads and what the cache keys on."""
    return _clean_caption(_clean_caption(text)) if clean_caption else text.lower().strip()


# IF's caption cleaning (`_clean_caption` of diffusers' deepfloyd_if pipelines) as (pattern, replacement)
# rules applied in order, quirks kept: T5 must read exactly the text IF's pipelines give it.
_DOMAIN = r"[a-zA-Z0-9.-]+\.(?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@)"
_CLEAN_URLS = (  # before HTML parsing
    ("<person>", "person"),
    (r"\b(?:https?:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + ")", ""),  # the scheme, then bare domains + paths
    (r"\b(?:www:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + ")", ""),  # again: the first pass may expose domains
)
_CLEAN_TEXT = (  # on the text of the HTML
    (r"@\w+\b", ""),  # @mentions
    ("[\u31c0-\u9fff]+", ""),  # CJK: strokes, katakana ext., enclosed, compatibility, ideographs (+ ext. A)
    ("[-\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32"
     "\ufe58\ufe63\uff0d]+", "-"),  # every kind of dash
    ("[`´«»“”¨]", '"'), ("[‘’]", "'"),  # quotes to one standard
    ("&quot;?", ""), ("&amp", ""),  # entities bs4 left (it decoded the rest)
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
    (r"\d:\d\d\s+$", ""),  # article ids at the end
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),  # #123, #12345.., 123456..
    (r"\S+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"']{2,}", '"'), (r"\.{2,}", " "),  # """shouting""", ellipses
    (r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]+", " "),  # ***stars***, #tags, brackets, slashes
    (r"\s+\.\s+", " "),  # a lone " . "
)
_CLEAN_CODES = (  # after ftfy and unescaping
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # product codes: jc6640, jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(?:worldwide\s+)?(?:free\s+)?shipping", ""), (r"(?:free\s)?download(?:\sfree)?", ""),  # shop talk
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(?:\simages?)?", ""), (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+:\s+", ": "), (r"(\D[,./])\b", r"\1 "),  # space after punctuation, not inside 1,000 or 2.5
    (r"\s+", " "),
    (r"^[\"'](.+)[\"']$", r"\1"),  # outer quotes (IF strips only after this: a leading space keeps them)
    (r"^['_,:;-]", ""), (r"['_,:+-]$", ""), (r"^\.\S+$", ""),  # a stray mark at either end; a lone ".xyz"
)


def _clean_caption(text: str) -> str:
    """One pass of IF's heavy caption cleaning."""
    try:
        import ftfy
        from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning
    except ImportError as e:  # IF's pipelines fall back to no cleaning here; a cache must not key on that
        raise ImportError(f"clean_caption=True needs `pip install beautifulsoup4 ftfy` ({e.name} is missing), "
                          "or set clean_caption=False (the default: lowercase and strip)") from e
    import html
    import re
    import warnings
    from urllib.parse import unquote_plus

    text = unquote_plus(str(text)).strip().lower()
    for pattern, repl in _CLEAN_URLS:
        text = re.sub(pattern, repl, text)
    with warnings.catch_warnings():  # bs4's "looks like a URL/file name" is noise for captions
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        text = BeautifulSoup(text, features="html.parser").text
    for pattern, repl in _CLEAN_TEXT:
        text = re.sub(pattern, repl, text)
    if len(re.findall("[-_]", text)) > 3:  # this-is-my-cute-cat, this_is_my_cute_cat
        text = re.sub("[-_]", " ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    for pattern, repl in _CLEAN_CODES:
        text = re.sub(pattern, repl, text)
    return text.strip()


def caption_key(prepared: str, identity: str, max_length: int, dtype: torch.dtype) -> bytes:
    """sha256 of everything that decides an embedding; 32 bytes."""
    return hashlib.sha256(json.dumps([prepared, identity, max_length, str(dtype)]).encode()).digest()


# ---------------------------------------------------------------------------------------------
# the encoder


class TextEncoder:
    """T5 encoder + tokenizer from a diffusers-layout folder (text_encoder/ + tokenizer/), a plain
    T5 folder, or a Hub id. dtype "auto"/None: bf16 on CUDA (as IF ran it), else fp32, which on CPU is more
    precise and never slowed by missing bf16 hardware; bf16 needs AVX512-BF16/AMX to be fast (with AMX
    it measured ~3x faster than fp32 for a 512-wide T5): pass dtype="bf16" there. The dtype is part of
    the cache identity."""

    def __init__(self, path_or_repo_id: str, *, max_length: int = 77, dtype=None, device=None,
                 clean_caption: bool = False):
        import transformers
        from transformers import AutoTokenizer, T5EncoderModel

        prepare_caption("", clean_caption)  # fail now, not after loading 9.5 GB
        cuda = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
        self.device = torch.device(device) if device is not None else (cuda or torch.device("cpu"))
        # int8: the weights held in int8 (quant.py), computing in bf16; loaded in bf16 on the CPU and quantised
        # there, so only the int8 weights reach the device
        self.int8 = str(dtype) == "int8"
        self.dtype = torch.bfloat16 if self.int8 else torch_dtype(dtype, self.device)
        self.max_length, self.clean_caption, self.name = max_length, clean_caption, str(path_or_repo_id)
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"

        def load(sub_model: str, sub_tokenizer: str):
            kw = {dtype_kw: self.dtype, "subfolder": sub_model}
            try:  # SDPA inside T5 where this transformers offers it
                model = T5EncoderModel.from_pretrained(src, attn_implementation="sdpa", **kw)
            except ValueError:
                model = T5EncoderModel.from_pretrained(src, **kw)
            return model, AutoTokenizer.from_pretrained(src, subfolder=sub_tokenizer)

        p = Path(path_or_repo_id).expanduser()
        src = str(p) if p.is_dir() else str(path_or_repo_id)
        if not p.is_dir():  # Hub id: only the two subfolders of a diffusers repo, else a plain T5 repo
            try:
                self.model, self.tokenizer = load("text_encoder", "tokenizer")
            except OSError:
                self.model, self.tokenizer = load("", "")
        elif (p / "text_encoder").is_dir():  # diffusers layout
            self.model, self.tokenizer = load("text_encoder", "tokenizer")
        elif (p / "config.json").is_file():  # plain T5 folder
            self.model, self.tokenizer = load("", "")
        else:
            raise FileNotFoundError(f"{p} has neither text_encoder/ (diffusers layout) nor config.json (a T5 "
                                    f"folder); set text_encoder to a folder or Hub id with a T5, e.g. {IF_T5}")
        self.model.eval().requires_grad_(False)
        if self.int8:
            import quant

            quant.quantise_(self.model)
        self.model.to(self.device)
        if self.tokenizer("a").input_ids[-1] != self.tokenizer.eos_token_id:
            raise ValueError(f"the tokenizer of {self.name} does not append </s>; IF's T5 tokenizer does")
        self.identity = self._fingerprint()

    def _fingerprint(self) -> str:
        """Name-independent identity: architecture, vocabulary, a sample of every weight, dtype. The same
        weights loaded from a folder or the Hub give the same identity; a fine-tune does not."""
        c = self.model.config
        h = hashlib.sha256(json.dumps([c.d_model, c.d_kv, c.d_ff, c.num_layers, c.num_heads, c.feed_forward_proj,
                                       c.relative_attention_num_buckets, c.relative_attention_max_distance,
                                       c.layer_norm_epsilon, sorted(self.tokenizer.get_vocab().items())]).encode())
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode() + p.flatten()[:64].float().cpu().numpy().tobytes())
        dtype = "int8" if self.int8 else str(self.dtype).removeprefix("torch.")
        return f"t5-d{c.d_model}-l{c.num_layers}-{dtype}-{h.hexdigest()[:16]}"

    def tokenize(self, prepared: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """IF's tokenization: ids and attention mask, both [B, L] int64."""
        t = self.tokenizer(prepared, padding="max_length", max_length=self.max_length, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return t.input_ids, t.attention_mask

    @torch.inference_mode()
    def encode(self, captions: list[str] | str, return_mask: bool = False):
        """Captions -> T5 last hidden states [B, L, D] (model dtype, on its device); mask [B, L] if asked."""
        captions = [captions] if isinstance(captions, str) else captions
        ids, mask = self.tokenize([prepare_caption(c, self.clean_caption) for c in captions])
        emb = self.model(ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state  # [B, L, D]
        return (emb, mask) if return_mask else emb

    def free(self) -> None:
        """Drop T5 from (GPU) memory."""
        import gc

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()


def make_tiny_t5(out_dir, texts: list[str], *, d_model: int = 32, layers: int = 2, heads: int = 2, d_ff: int = 64,
                 vocab_size: int = 256, tokenizer_type: str = "unigram", seed: int = 0) -> Path:
    """A random-weight T5 encoder + a SentencePiece tokenizer trained on `texts`, saved in the diffusers
    layout (out_dir/text_encoder, out_dir/tokenizer) so TextEncoder loads it like the real one.
    `tokenizer_type`: SentencePiece's "unigram" (as T5's) or "word" (whole words: a tiny random T5 cannot
    learn to spell, so a demo that must tell "red" from "blue" quickly wants one token per word)."""
    import io

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out = Path(out_dir)
    buf = io.BytesIO()  # T5's special ids: <pad>=0, </s>=1, <unk>=2, no <s>
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
                                   model_type=tokenizer_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
                                   normalization_rule_name="identity", num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(out / "tokenizer")
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                      num_heads=heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        T5EncoderModel(config).save_pretrained(out / "text_encoder")
    return out


# ---------------------------------------------------------------------------------------------
# the cache


class MissingCaptionError(LookupError):
    """A caption asked of a TextCache that was never encoded into it."""


def _keys(t: torch.Tensor) -> list[bytes]:
    kb = t.numpy().tobytes()  # [N, 32] uint8 -> N sha256 digests
    return [kb[i:i + 32] for i in range(0, len(kb), 32)]


def _atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the folder: after a crash the file is either absent or complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mmap_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a .safetensors file as views of one copy-on-write memory map (nothing read yet)."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    n = int.from_bytes(mm[:8], "little")  # format: u64 header size, JSON header, raw little-endian data
    header = json.loads(mm[8:8 + n])
    data = torch.frombuffer(mm, dtype=torch.uint8)[8 + n:]
    meta = header.pop("__metadata__", {}) or {}
    tensors = {k: data[v["data_offsets"][0]:v["data_offsets"][1]].view(SAFETENSORS_DTYPES[v["dtype"]])
               .view(v["shape"]) for k, v in header.items()}
    return tensors, meta


def _check_meta(cache_dir: Path, have: dict, want: dict) -> None:
    diff = {k: (have.get(k), v) for k, v in want.items() if have and have.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: cache has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"the text cache at {cache_dir} was built with other settings ({detail}); it will not be "
                         f"mixed. Use another text_cache_dir, or delete {cache_dir} to rebuild it.")


def _scan(cache_dir: Path) -> dict[str, tuple[dict, list[bytes]]]:
    """Every complete shard in the folder, indexed or not -> (its settings, its keys). A shard renamed
    into place just before a crash, or written by another rank, is adopted here."""
    shards = {}
    for p in sorted(cache_dir.glob("shard-*.safetensors")):
        tensors, meta = _mmap_safetensors(p)
        shards[p.name] = ({k: json.loads(v) for k, v in meta.items()}, _keys(tensors["keys"]))
    return shards


def _source_stamp(src: str) -> str:
    """Names, sizes and mtimes of a local encoder's files (the Hub id itself otherwise): if unchanged since
    the last build, the cache's identity can be trusted without loading T5 again."""
    p = Path(src).expanduser()
    if not p.is_dir():
        return src
    files = sorted(f for f in p.rglob("*") if f.is_file())
    stamp = [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


class TextCache:
    """Read side: `get(captions) -> [B, L, D]` (mask [B, L] int64 too with return_mask=True)."""

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        if not (self.dir / "index.json").is_file():
            raise FileNotFoundError(f"no text cache at {self.dir} (no index.json); build it with `{BUILD_CMD}`")
        self.meta = json.loads((self.dir / "index.json").read_text())
        self.dtype = torch_dtype(self.meta["dtype"])
        self.emb, self.lengths, self.rows = [], [], {}  # rows: key -> (shard, row)
        self._keys: dict[str, bytes] = {}  # caption -> key: training asks for the same captions every epoch
        for s, name in enumerate(self.meta["shards"]):
            tensors, _ = _mmap_safetensors(self.dir / name)
            self.emb.append(tensors["emb"])  # [N, L, D], memory-mapped
            self.lengths.append(tensors["lengths"])
            self.rows.update((k, (s, i)) for i, k in enumerate(_keys(tensors["keys"])))

    def key(self, caption: str) -> bytes:
        """The cache key of a raw caption, computed (preparation + hash, the heavy cleaning included) once."""
        if caption not in self._keys:
            m = self.meta
            self._keys[caption] = caption_key(prepare_caption(caption, m["clean_caption"]), m["identity"],
                                              m["max_length"], self.dtype)
        return self._keys[caption]

    def missing(self, captions: list[str]) -> list[str]:
        return [c for c in dict.fromkeys(captions) if self.key(c) not in self.rows]

    def has(self, captions: list[str] | str) -> bool:
        return not self.missing([captions] if isinstance(captions, str) else captions)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, captions: list[str], return_mask: bool = False, out: torch.Tensor | None = None):
        """`out` ([B, L, D], e.g. a pinned buffer reused every step) saves a fresh allocation, whose page
        faults cost more than the copy itself."""
        locs = [self.rows.get(self.key(c)) for c in captions]
        if None in locs:
            missing = [c for c, loc in zip(captions, locs) if loc is None]
            raise MissingCaptionError(
                f"{len(missing)} caption(s) not in the text cache {self.dir} (encoder {self.meta['encoder']}, "
                f"max_length {self.meta['max_length']}), e.g. {missing[0]!r}. Build them with `{BUILD_CMD}` "
                "(it encodes only what is missing).")
        emb = torch.empty(len(locs), *self.emb[0].shape[1:], dtype=self.dtype) if out is None else out  # [B, L, D]
        for j, (s, r) in enumerate(locs):
            emb[j].copy_(self.emb[s][r])  # reads only this row's pages of the memory map
        if not return_mask:
            return emb
        lengths = torch.stack([self.lengths[s][r] for s, r in locs]).long()  # [B]
        return emb, (torch.arange(emb.shape[1]) < lengths[:, None]).long()  # [B, L]


def build_cache(captions: list[str], encoder, cache_dir, *, batch_size: int = 32, max_length: int = 77,
                encoder_dtype=None, dtype=torch.bfloat16, clean_caption: bool = False, device=None,
                shard_size: int | None = None, progress: bool = True) -> dict:
    """Encode every caption not yet in `cache_dir` (plus ""), once each, in batches, into new shards.
    `encoder` is a TextEncoder, or a path/Hub id loaded only if something is missing. Under torchrun
    each rank encodes every WORLD_SIZE-th missing caption into its own shards; after a barrier rank 0
    indexes them all. Returns counts (total, cached, encoded), bytes on disk and captions/s."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cache_dir, dtype = Path(cache_dir), torch_dtype(dtype)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if isinstance(encoder, TextEncoder):
        max_length, clean_caption = encoder.max_length, encoder.clean_caption
    prepared = list(dict.fromkeys(prepare_caption(c, clean_caption) for c in [*captions, ""]))  # dedup
    want = {"max_length": max_length, "dtype": str(dtype).removeprefix("torch."), "clean_caption": clean_caption}
    index_path = cache_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    _check_meta(cache_dir, index, want)
    for tmp in cache_dir.glob(f"shard-r{rank}-*.tmp"):  # the shard in flight when a build was killed
        tmp.unlink()
    shards = _scan(cache_dir)
    stored = {k for _, keys in shards.values() for k in keys}
    # Fast path: same encoder files, same settings, nothing missing -> T5 need not be loaded at all.
    if (not isinstance(encoder, TextEncoder) and index.get("source") == _source_stamp(str(encoder))
            and set(index["shards"]) == set(shards)
            and all(caption_key(p, index["identity"], max_length, dtype) in stored for p in prepared)):
        return _report(cache_dir, len(prepared), 0, 0.0, rank)
    if not isinstance(encoder, TextEncoder):
        encoder = TextEncoder(encoder, max_length=max_length, dtype=encoder_dtype, device=device,
                              clean_caption=clean_caption)
    want["identity"] = encoder.identity
    for m, _ in [(index, None), *shards.values()]:
        _check_meta(cache_dir, m, want)
    meta = {**want, "encoder": encoder.name, "source": _source_stamp(encoder.name),
            "dim": encoder.model.config.d_model}
    todo = [p for p in prepared if caption_key(p, encoder.identity, max_length, dtype) not in stored][rank::world]
    if world > 1:
        dist.barrier()  # every rank has split the same list before any rank writes a shard
    # No sorting by length: IF keeps all L outputs (pad positions included), so every caption costs a
    # full L-token forward whatever its length; padding to the batch's longest would change the result.
    shard_size = shard_size or max(1, (256 << 20) // (max_length * meta["dim"] * dtype.itemsize))  # ~256 MiB
    seq = 1 + max([int(p.stem.split("-")[-1]) for p in cache_dir.glob(f"shard-r{rank}-*.safetensors")], default=-1)
    buf_emb, buf_len, buf_keys = [], [], []

    def flush():
        nonlocal seq, buf_emb, buf_len, buf_keys
        from safetensors.torch import save
        tensors = {"emb": torch.cat(buf_emb), "lengths": torch.cat(buf_len),  # [N, L, D], [N]
                   "keys": torch.frombuffer(bytearray(b"".join(buf_keys)), dtype=torch.uint8).view(-1, 32)}
        name = f"shard-r{rank}-{seq:06d}.safetensors"
        _atomic_write(cache_dir / name, save(tensors, metadata={k: json.dumps(v) for k, v in want.items()}))
        shards[name] = (want, buf_keys)
        if world == 1:  # the shard is in place: now name it in the index
            _write_index(cache_dir, meta, shards)
        seq, buf_emb, buf_len, buf_keys = seq + 1, [], [], []

    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc="T5", unit="caption", disable=not progress or rank != 0)
    t_enc = time.time()
    for i in range(0, len(todo), batch_size):
        batch = todo[i:i + batch_size]
        emb, mask = encoder.encode(batch, return_mask=True)  # [b, L, D], [b, L]
        lengths = mask.sum(1)
        if not torch.equal(mask, (torch.arange(mask.shape[1]) < lengths[:, None]).long()):
            raise ValueError("this tokenizer pads on the left; the cache stores masks as lengths (T5 pads right)")
        buf_emb.append(emb.to("cpu", dtype))
        buf_len.append(lengths.int())
        buf_keys += [caption_key(p, encoder.identity, max_length, dtype) for p in batch]
        if len(buf_keys) >= shard_size:
            flush()
        bar.update(len(batch))
    if buf_keys:
        flush()
    bar.close()
    t_enc = time.time() - t_enc
    if world > 1:
        dist.barrier()  # every rank's shards are in place
        if rank == 0:
            _write_index(cache_dir, meta, _scan(cache_dir))
        dist.barrier()  # and the index names them all
    else:
        _write_index(cache_dir, meta, shards)  # also adopts shards a killed build renamed but never indexed
    return _report(cache_dir, len(prepared), len(todo), t_enc, rank)


def _write_index(cache_dir: Path, meta: dict, shards: dict) -> None:
    index = {**meta, "shards": sorted(shards), "captions": sum(len(keys) for _, keys in shards.values())}
    _atomic_write(cache_dir / "index.json", (json.dumps(index, indent=1) + "\n").encode())


def _report(cache_dir: Path, total: int, encoded: int, seconds: float, rank: int) -> dict:
    size = sum(p.stat().st_size for p in cache_dir.glob("shard-*.safetensors"))
    index_bytes = (cache_dir / "index.json").stat().st_size
    rate = encoded / seconds if encoded else None
    if rank == 0:
        speed = f" in {seconds:.1f} s, {rate:.1f} captions/s" if encoded else ""
        print(f"t5cache: {total} captions: {total - encoded} already cached, {encoded} encoded{speed}; "
              f"{cache_dir}: {size / 2**20:.1f} MiB of shards + {index_bytes / 1024:.1f} KiB index")
    return {"total": total, "cached": total - encoded, "encoded": encoded, "bytes": size,
            "index_bytes": index_bytes, "captions_per_s": rate}


# ---------------------------------------------------------------------------------------------
# from a config: the one way train.py, sample.py and the command line reach the cache


def prepare(cfg, captions: list[str], *, progress: bool = True) -> TextCache:
    """The text cache `cfg` reads, holding every caption of `captions` (and ""): the folder is
    default_cache_dir(cfg), the encoder default_text_encoder(cfg), and max_length, clean_caption, the
    encoder's dtype, batch size and device are the config's. Only missing captions are encoded, and T5 is
    loaded only then (see build_cache); under torchrun every rank must call it, as they share the work."""
    cache_dir = default_cache_dir(cfg)
    build_cache(captions, default_text_encoder(cfg), cache_dir, batch_size=cfg.text_encoder_batch_size,
                max_length=cfg.tokenizer_max_length, encoder_dtype=cfg.text_encoder_dtype,  # TextEncoder reads "auto"
                clean_caption=cfg.clean_caption, device=cfg.device, progress=progress)
    return TextCache(cache_dir)


def run_captions(cfg) -> list[str]:
    """Every caption a training run can ask the cache for: the datasets', the validation prompts, both negative
    prompts and "" (caption dropout), with prior preservation the class prompt; deduplicated, in a stable order."""
    import data  # here, not at the top: the encoder and the cache need none of the image code

    prior = [cfg.class_prompt] if cfg.with_prior_preservation and cfg.class_prompt else []
    return list(dict.fromkeys([*data.all_captions(cfg), *prior, *cfg.validation_prompts,
                               cfg.validation_negative_prompt, cfg.negative_prompt, ""]))


def default_cache_dir(cfg) -> str:
    """cfg.text_cache_dir, else the cache_dir of a multidatabackend.json's text_embeds entry, else cache/t5 beside
    output_dir (./cache/t5 for the default output_dir), so runs with different output_dirs next to each other
    share one cache (entries are keyed by encoder)."""
    import data  # which text_embeds entry counts is data.py's to say

    return data.text_cache_dir_from(cfg) or str(Path(cfg.output_dir).parent / "cache" / "t5")


def default_text_encoder(cfg) -> str:
    """The T5 (a folder or Hub id) that goes with cfg's weights:
    1. cfg.text_encoder, if set;
    2. else cfg.weights, if it is a local folder with text_encoder/ (a diffusers-layout download);
    3. else, if cfg.weights is a training run's output_dir (it holds the config.json train.py writes), the T5 that
       run was trained with: its text_encoder, else the T5 of its own base weights by these same rules;
    4. else a Hub id itself (a diffusers repo with text_encoder/ - every DeepFloyd/IF-* repo, stage II's included,
       carries the same T5 v1.1 XXL - or a plain T5 repo).
    Any other local folder is an error: nothing in it says which T5 its U-Net was trained with."""
    return _text_encoder_of(cfg.text_encoder, cfg.weights, [])


RUN_CONFIG_KEYS = ("text_encoder", "pretrained", "model_flavour")  # what decides a run's T5 (config.Config fields)


def _text_encoder_of(text_encoder: str | None, weights: str, runs: list[tuple[Path, str]]) -> str:
    """default_text_encoder's rules; `runs`: the training runs' folders followed so far, (resolved, as named)."""
    if text_encoder:
        return text_encoder
    folder = Path(weights).expanduser()
    if not folder.is_dir():  # a Hub id
        return weights
    if (folder / "text_encoder").is_dir():
        return weights
    base_of = f" (the base weights of {runs[-1][1]}, by its config.json)" if runs else ""
    saved = _run_config(folder)
    if saved is None:
        raise FileNotFoundError(f"{weights}{base_of} has no text_encoder/ and no training config.json to say which "
                                f"T5 it was trained with; pass --text_encoder=FOLDER_OR_HUB_ID ({IF_T5} for the T5 "
                                "every IF stage shares)")
    if folder.resolve() in [resolved for resolved, _ in runs]:
        chain = " -> ".join([shown for _, shown in runs] + [weights])
        raise ValueError(f"the training configs' base weights go round in a circle ({chain}: each config.json's "
                         "`pretrained` names the next), so none says which T5 they were trained with; pass "
                         f"--text_encoder=FOLDER_OR_HUB_ID ({IF_T5} for the T5 every IF stage shares)")
    from config import Config  # its `weights` says what a run's base weights were

    run = Config(**{k: saved[k] for k in RUN_CONFIG_KEYS})
    return _text_encoder_of(run.text_encoder, run.weights, [*runs, (folder.resolve(), weights)])


def _run_config(folder: Path) -> dict | None:
    """The resolved config train.py saved in its output_dir (config.json), or None if `folder` holds none. A
    diffusers unet/ or T5 folder has a config.json too, without these keys."""
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and all(k in saved for k in RUN_CONFIG_KEYS) else None


def main(cfg) -> TextCache:
    return prepare(cfg, run_captions(cfg))


if __name__ == "__main__":
    from config import parse_args

    main(parse_args(usage=f"usage: {BUILD_CMD} [--key=value ...]   (encode every caption into the text cache)"))
