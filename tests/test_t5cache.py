"""t5cache.py against a direct T5EncoderModel forward with IF's tokenization, on a tiny random T5."""

import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

import data
import t5cache
from config import Config, load_config

WORDS = ("a photo of the cat dog red blue green big small house tree under over sky an with on in painting "
         "portrait castle river mountain at night sunset watercolor oil sketch").split()


def captions(n: int, seed: int = 0) -> list[str]:
    """n distinct lowercase captions of 1 to 25 words."""
    rng, out = random.Random(seed), {}
    while len(out) < n:
        out[" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25)))] = None
    return list(out)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return t5cache.make_tiny_t5(tmp_path_factory.mktemp("t5"), captions(300, seed=123))


def reference(tiny, prepared: list[str], max_length: int = 77):
    """What IF's pipeline does, straight through transformers: one batch, fp32."""
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    model = T5EncoderModel.from_pretrained(tiny / "text_encoder").eval()
    t = tok(prepared, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
            return_tensors="pt")
    with torch.no_grad():
        return model(t.input_ids, attention_mask=t.attention_mask).last_hidden_state, t.attention_mask, tok


def test_cache_equals_pipeline_forward_bit_for_bit(tiny, tmp_path):
    long = " ".join(captions(12, seed=7))  # far more than 77 tokens
    raw = ["A Photo of a CAT  ", "a photo of a cat", "\tRed House\n", "red house", long, *captions(300), "Sky"]
    prepared = list(dict.fromkeys([c.lower().strip() for c in raw] + [""]))  # the order build_cache encodes in
    ref, ref_mask, tok = reference(tiny, prepared)  # [N, 77, 32]

    untruncated = tok(long.lower()).input_ids
    assert len(untruncated) > 77
    truncated = tok(long.lower(), max_length=77, truncation=True).input_ids
    assert truncated == untruncated[:76] + [tok.eos_token_id]  # T5 keeps </s> as the last of the 77

    for dtype in (torch.bfloat16, torch.float32):
        cache_dir = tmp_path / str(dtype)
        stats = t5cache.build_cache(raw, str(tiny), cache_dir, batch_size=512, dtype=dtype, progress=False)
        assert stats["encoded"] == len(prepared) <= len(raw) - 2 + 1  # two duplicates after lowercasing, plus ""
        cache = t5cache.TextCache(cache_dir)
        emb, mask = cache.get(raw, return_mask=True)
        rows = [prepared.index(c.lower().strip()) for c in raw]
        assert emb.dtype == dtype and emb.shape == (len(raw), 77, 32)
        assert torch.equal(emb, ref[rows].to(dtype))
        assert torch.equal(mask, ref_mask[rows])
        assert mask[4].all() and mask[1].sum() == 6  # the long caption fills all 77; "a photo of a cat" + </s>
        assert emb[1, 6:].abs().sum() > 0  # pad positions are kept, not zeroed
        assert torch.equal(cache.get([""]), ref[[prepared.index("")]].to(dtype))

    # bytes on disk: shards within 1% of the raw [N, 77, 32] bf16 payload; the index is reported apart
    shards = list((tmp_path / str(torch.bfloat16)).glob("shard-*.safetensors"))
    payload = len(prepared) * 77 * 32 * 2
    assert sum(p.stat().st_size for p in shards) / payload < 1.01
    assert (tmp_path / str(torch.bfloat16) / "index.json").stat().st_size < 1024


def test_batched_encoding_matches_per_caption(tiny):
    # Every caption is padded to the same 77 tokens and T5 masks only keys, so a row's result cannot depend
    # on its batch-mates; only the GEMM kernel's blocking over the batch may change the fp32 summation
    # order, hence fp32 rounding-level tolerances (assert_close's fp32 defaults).
    enc = t5cache.TextEncoder(str(tiny))
    caps = captions(12, seed=5)
    batched = enc.encode(caps)
    single = torch.cat([enc.encode([c]) for c in caps])
    torch.testing.assert_close(batched, single)


def _slow_build(tiny, cache_dir, caps):
    enc = t5cache.TextEncoder(str(tiny))
    encode = enc.encode
    enc.encode = lambda *a, **k: (time.sleep(0.1), encode(*a, **k))[1]
    t5cache.build_cache(caps, enc, cache_dir, batch_size=4, shard_size=4, progress=False)


def test_killed_build_resumes_without_recomputing(tiny, tmp_path):
    caps = captions(60, seed=11)
    prepared = list(dict.fromkeys([c.lower().strip() for c in caps] + [""]))
    cache_dir = tmp_path / "cache"
    child = multiprocessing.get_context("fork").Process(target=_slow_build, args=(tiny, cache_dir, caps))
    child.start()
    deadline = time.time() + 30
    while len(list(cache_dir.glob("shard-*.safetensors"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL  # killed mid-way, not finished
    shards = sorted(cache_dir.glob("shard-*.safetensors"))
    assert 3 <= len(shards) < 16
    # Simulate the worst moments of a crash: a half-written shard, and a shard renamed into place but not
    # yet named in the index.
    (cache_dir / "shard-r0-000999.safetensors.tmp").write_bytes(b"\x00" * 100)
    index = json.loads((cache_dir / "index.json").read_text())
    index["shards"] = [s for s in index["shards"] if s != shards[-1].name]
    (cache_dir / "index.json").write_text(json.dumps(index))
    stored = sum(len(keys) for _, keys in t5cache._scan(cache_dir).values())
    assert 12 <= stored < len(prepared)

    enc = t5cache.TextEncoder(str(tiny))
    encoded = []
    encode = enc.encode
    enc.encode = lambda batch, **k: (encoded.extend(batch), encode(batch, **k))[1]
    stats = t5cache.build_cache(caps, enc, cache_dir, batch_size=4, shard_size=4, progress=False)
    assert len(encoded) == stats["encoded"] == len(prepared) - stored  # nothing stored is encoded again
    assert not list(cache_dir.glob("*.tmp"))

    cache = t5cache.TextCache(cache_dir)
    assert len(cache) == len(prepared) and cache.meta["shards"] == [p.name for p in
                                                                   sorted(cache_dir.glob("shard-*.safetensors"))]
    ref, _, _ = reference(tiny, prepared)
    # Cached rows came from other batches than the reference's one batch (see the test above): to one
    # bf16 rounding step. A corrupt or misplaced row would be off by far more.
    torch.testing.assert_close(cache.get(prepared).float(), ref.bfloat16().float(), rtol=2**-8, atol=0)


def test_other_settings_or_encoder_are_refused(tiny, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    t5cache.build_cache(["a cat"], str(tiny), cache_dir, progress=False)
    with pytest.raises(ValueError, match="max_length: cache has 77, asked 32"):
        t5cache.build_cache(["a dog"], str(tiny), cache_dir, max_length=32, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        t5cache.build_cache(["a dog"], str(tiny), cache_dir, dtype=torch.float32, progress=False)
    other = t5cache.make_tiny_t5(tmp_path / "other", captions(300, seed=123), seed=1)  # same shape, other weights
    with pytest.raises(ValueError, match="identity"):
        t5cache.build_cache(["a dog"], str(other), cache_dir, progress=False)
    with pytest.raises(ValueError, match="identity"):
        t5cache.build_cache(["a dog"], str(tiny), cache_dir, encoder_dtype="bf16", progress=False)
    assert t5cache.TextCache(cache_dir).missing(["a cat", "a dog", ""]) == ["a dog"]  # nothing was mixed in

    # Unchanged encoder files and nothing missing: T5 is not even loaded.
    class NoLoad(t5cache.TextEncoder):
        def __init__(self, *a, **k):
            raise AssertionError("T5 loaded although everything is cached")

    monkeypatch.setattr(t5cache, "TextEncoder", NoLoad)
    assert t5cache.build_cache(["A cat "], str(tiny), cache_dir, progress=False)["encoded"] == 0


def test_missing_caption_error_and_no_file_opens(tiny, tmp_path, monkeypatch):
    t5cache.build_cache(["a cat", "a dog"], str(tiny), tmp_path, progress=False)
    cache = t5cache.TextCache(tmp_path)
    assert cache.has(["A Cat", "", "a dog"]) and not cache.has("a bird")
    assert cache.missing(["a bird", "a cat", "a bird"]) == ["a bird"]
    with pytest.raises(t5cache.MissingCaptionError, match=r"'a bird'.*python t5cache\.py CONFIG"):
        cache.get(["a cat", "a bird"])

    def fail(*a, **k):
        raise AssertionError("a file was opened on the hot path")

    monkeypatch.setattr("builtins.open", fail)
    monkeypatch.setattr("mmap.mmap", fail)
    assert cache.get(["a dog", "a cat", "a dog"]).shape == (3, 77, 32)


def test_command_line_gathers_every_caption(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "all_captions", lambda cfg: ["Cat", "dog"])
    cfg = load_config([f"--text_encoder={tiny}", f"--text_cache_dir={tmp_path / 'c'}",
                       "--validation_prompts=['V1', 'dog']", "--validation_negative_prompt=blurry",
                       "--negative_prompt=ugly", "--tokenizer_max_length=40"])
    assert t5cache.run_captions(cfg) == ["Cat", "dog", "V1", "blurry", "ugly", ""]
    cache = t5cache.main(cfg)
    assert cache.dir == tmp_path / "c" and len(cache) == 6
    assert cache.has(["cat", "DOG", "v1", "blurry", "ugly", ""]) and cache.get(["cat"]).shape == (1, 40, 32)


def test_command_line_writes_where_training_reads(tiny, tmp_path):
    """A multidatabackend.json's text_embeds cache_dir is the cache of `python t5cache.py CONFIG` too."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a_red_cat", "a_blue_dog"):
        Image.new("RGB", (64, 64)).save(images / f"{name}.png")
    backend = [{"id": "pictures", "type": "local", "instance_data_dir": str(images), "caption_strategy": "filename"},
               {"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local",
                "cache_dir": str(tmp_path / "embeds")}]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    (tmp_path / "run.py").write_text(f"text_encoder = {str(tiny)!r}\n"
                                     f"datasets = {str(tmp_path / 'multidatabackend.json')!r}\n"
                                     f"output_dir = {str(tmp_path / 'out')!r}\n")
    cfg = load_config([str(tmp_path / "run.py")])
    assert t5cache.default_cache_dir(cfg) == str(tmp_path / "embeds")
    cache = t5cache.main(cfg)
    assert cache.dir == tmp_path / "embeds" and cache.has(["a red cat", "a blue dog", ""]) and len(cache) == 3
    assert not (tmp_path / "cache").exists()  # not the default beside output_dir


def test_prepare_takes_every_setting_from_the_config(tiny, tmp_path, monkeypatch):
    raw = "A <b>Cat</b> at https://example.com/cats/"  # cleaning gives "a cat at"; lower + strip would not
    cfg = load_config([f"--text_encoder={tiny}", f"--text_cache_dir={tmp_path}", "--clean_caption=True",
                       "--tokenizer_max_length=40", "--text_encoder_batch_size=2", "--text_encoder_dtype=fp32",
                       "--device=cpu"])
    calls = []
    build = t5cache.build_cache
    monkeypatch.setattr(t5cache, "build_cache", lambda *a, **k: (calls.append(k), build(*a, **k))[1])
    cache = t5cache.prepare(cfg, [raw, "a dog"], progress=False)
    assert {k: calls[0][k] for k in ("batch_size", "encoder_dtype", "device")} == {
        "batch_size": 2, "encoder_dtype": "fp32", "device": "cpu"}
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["clean_caption"] is True and index["max_length"] == 40 and "float32" in index["identity"]
    assert t5cache.caption_key("a cat at", index["identity"], 40, torch.bfloat16) in cache.rows
    assert t5cache.caption_key(raw.lower().strip(), index["identity"], 40, torch.bfloat16) not in cache.rows
    ref, _, _ = reference(tiny, ["a cat at"], max_length=40)
    # another batch than the reference's: to one bf16 rounding step (see test_killed_build_resumes...)
    torch.testing.assert_close(cache.get([raw]).float(), ref.bfloat16().float(), rtol=2**-8, atol=0)


def test_prepare_again_does_not_load_t5(tiny, tmp_path, monkeypatch):
    cfg = load_config([f"--text_encoder={tiny}", f"--text_cache_dir={tmp_path}"])
    loads = []

    class Counting(t5cache.TextEncoder):
        def __init__(self, *a, **k):
            loads.append(a[0])
            super().__init__(*a, **k)

    monkeypatch.setattr(t5cache, "TextEncoder", Counting)
    first = t5cache.prepare(cfg, ["a cat", "a dog"], progress=False)
    second = t5cache.prepare(cfg, ["a dog", "A Cat"], progress=False)
    assert loads == [str(tiny)]  # the second call found everything cached and never loaded T5
    assert torch.equal(second.get(["a cat", "a dog"]), first.get(["a cat", "a dog"]))
    assert len(t5cache.prepare(cfg, ["a bird"], progress=False)) == 4 and len(loads) == 2  # missing: loaded


def test_default_cache_dir():
    assert t5cache.default_cache_dir(load_config([])) == os.path.join("cache", "t5")
    assert t5cache.default_cache_dir(load_config(["--output_dir=runs/a"])) == os.path.join("runs", "cache", "t5")
    assert t5cache.default_cache_dir(load_config(["--text_cache_dir=/x"])) == "/x"


# ---------------------------------------------------------------------------------------------
# default_text_encoder: which T5 goes with the weights


def training_run(folder, **values):
    """A training run's output_dir as far as its T5 goes: the config.json train.py writes (and a unet/)."""
    (folder / "unet").mkdir(parents=True)
    Config(**values).save(folder / "config.json")
    return str(folder)


def t5_for(*args) -> str:
    return t5cache.default_text_encoder(load_config(list(args)))


def test_text_encoder_option_wins(tmp_path):
    assert t5_for("--text_encoder=x/t5") == "x/t5"
    assert t5_for("--text_encoder=x/t5", f"--pretrained={tmp_path}") == "x/t5"  # even for a folder without T5


def test_text_encoder_of_a_diffusers_folder(tiny):
    assert t5_for(f"--pretrained={tiny}") == str(tiny)


def test_text_encoder_of_a_training_run(tiny, tmp_path):
    demo = training_run(tmp_path / "demo", text_encoder=str(tiny), model_type="full")
    assert t5_for(f"--pretrained={demo}") == str(tiny)  # its text_encoder
    lora_on_demo = training_run(tmp_path / "lora", pretrained=demo)
    assert t5_for(f"--pretrained={lora_on_demo}") == str(tiny)  # its base weights' run, recursively
    assert t5_for(f"--pretrained={training_run(tmp_path / 'ft', pretrained=str(tiny))}") == str(tiny)  # text_encoder/
    hub_ii = training_run(tmp_path / "ii", model_flavour="ii-medium-450m", model_type="full")
    assert t5_for(f"--pretrained={hub_ii}") == "DeepFloyd/IF-II-M-v1.0"  # its base weights, which carry T5
    hub_i = training_run(tmp_path / "i", model_flavour="i-large-900m", model_type="full")
    assert t5_for(f"--pretrained={hub_i}") == "DeepFloyd/IF-I-L-v1.0"
    assert json.loads((tmp_path / "i" / "config.json").read_text())["_code_version"]  # Config.save's file as is


def test_training_runs_that_name_each_other_are_an_error(tmp_path):
    again = training_run(tmp_path / "again", pretrained=str(tmp_path / "again"))  # trained on top of itself
    with pytest.raises(ValueError, match=r"circle .*again -> .*again.*pass --text_encoder=FOLDER_OR_HUB_ID"):
        t5_for(f"--pretrained={again}")
    training_run(tmp_path / "a", pretrained=str(tmp_path / "b"))
    training_run(tmp_path / "b", pretrained=str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"circle .*a -> .*b -> .*a:"):
        t5_for(f"--pretrained={tmp_path / 'a'}")


def test_text_encoder_of_hub_ids():
    assert t5_for("--pretrained=DeepFloyd/IF-II-L-v1.0") == "DeepFloyd/IF-II-L-v1.0"  # stage II repos carry T5 too
    assert t5_for("--model_flavour=ii-large-1.2b") == "DeepFloyd/IF-II-L-v1.0"
    assert t5_for("--pretrained=DeepFloyd/IF-I-M-v1.0") == "DeepFloyd/IF-I-M-v1.0"
    assert t5_for("--model_flavour=i-xlarge-4.3b") == "DeepFloyd/IF-I-XL-v1.0"
    assert t5_for("--pretrained=someone/their-if") == "someone/their-if"


def test_local_folder_without_t5_is_an_error(tmp_path):
    stage2 = tmp_path / "stage2"  # a stage II download, and its bare unet/ (whose config.json is the U-Net's)
    (stage2 / "unet").mkdir(parents=True)
    (stage2 / "model_index.json").write_text('{"_class_name": "IFSuperResolutionPipeline"}')
    (stage2 / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "in_channels": 6}')
    msg = (r"{} has no text_encoder/ and no training config\.json to say which T5 it was trained with; pass "
           r"--text_encoder=FOLDER_OR_HUB_ID \(DeepFloyd/IF-I-XL-v1\.0 for the T5 every IF stage shares\)")
    for folder in (stage2, stage2 / "unet"):
        with pytest.raises(FileNotFoundError, match=msg.format(folder.name)):
            t5_for(f"--pretrained={folder}")
    run = training_run(tmp_path / "run", pretrained=str(stage2))
    with pytest.raises(FileNotFoundError, match=r"stage2 \(the base weights of .*run, by its config\.json\) has no"):
        t5_for(f"--pretrained={run}")


# ---------------------------------------------------------------------------------------------
# clean_caption=True: IF's heavy cleaning, against the pipelines' own `_text_preprocessing`

NASTY = [
    "Check out https://www.Example.com/path?q=1&x=2 NOW", "visit www.site.ru/page-1/ or http:/x and ftp://f.org/pub",
    "john@example.com wrote to me.it", "http://a.com/b.jpg", "<p>A <b>bold</b> claim &amp; more</p>",
    "&lt;i&gt;italic&lt;/i&gt; &quot;quoted&quot and &amp;amp; &amp;lt;b&amp;gt;", "<script>x(1)</script>hello <br/>",
    "@john_doe meets @Jane99 at the park", "猫の写真 a cat 㐀 ㇀ ㈀ ㌀ ䷀ 한국어 ｶﾀｶﾅ", "emoji 🐱🐶✨ party 🎉 ❤️",
    "em—dash en–dash ‐ ‑ ‒ ― ⸗ 〜 ﹣ － ־ minus −", "«guillemets» “curly” ‘single’ `back´ ¨ „low“",
    "server 192.168.0.1 and 10.0.0.255:8080", "article 1:23   ", "line one\\nline two\nthree",
    "#1 best #12345 seller 1234567 items #1234 #tag", "photo IMG_1234.JPG and scan.pdf, file-name.webp x.png",
    '"""AUSVERKAUFT""" \'\'sold\'\' ...wait... ok .. fine.', "***SALE*** (limited) [new] {x} |y| a\\b a/b ~z ¿¡§",
    "this-is-my-cute-cat", "this_is_my_cute_cat_photo", "a-b-c d_e", "model jc6640 jc6640vc 6640vc231 j2d1a2a3 x9",
    "Worldwide Free Shipping! free download now, download free", "click for details, click on here, PNG images",
    "jpg image of page 12 in the book", "wallpaper 1920x1080, 2.5×3.5 and 800х600 3x", "1,000,000 dollars,2.5 kg,ok",
    "key : value, a.b.c,d/e", "'quoted caption'", '  "double quoted" ', "-leading dash", "trailing plus+",
    ":colon start", ".hidden", "MiXeD CaSe   WITH\t\ttabs\nand\r\nnewlines  ", "%20encoded%20url+plus+signs%2",
    "<person> walking a dog with <PERSON>", "mojibake: cafÃ© crÃ¨me â€œhiâ€\x9d", "Ünïcödé ÀÉÎ straße ﬁ Ⅻ ①",
    "…and ellipsis… wow!!!??? repeated,,, ;; !!", "", "   ", "\u2028sep\u00a0nbsp\u200bzero", "® © ™ • · º ½ ¾",
    "123456 789012345 12345 1:23", "'''triple''' \"'mixed'\"", "a . lone . dot .", "_x_", "trailing:", "'",
]


def if_preprocessing(texts: list[str]) -> list[str]:
    """diffusers' IF text preprocessing with clean_caption=True; it only needs the class's own attributes."""
    from diffusers import IFPipeline

    return IFPipeline.__new__(IFPipeline)._text_preprocessing(texts, clean_caption=True)


def test_clean_caption_matches_if_pipeline():
    assert len(NASTY) >= 40
    assert [t5cache.prepare_caption(c, clean_caption=True) for c in NASTY] == if_preprocessing(NASTY)
    # Random mixtures of the pieces every rule reacts to, so rules also meet each other's leftovers.
    pieces = ["http://", "https://x.", "www.", ".com", ".ru/", "a.it", "<b>", "</b>", "&amp;", "&quot;", "&lt;",
              "@", "#", "12", "123456", "1.2.3.4", "jc6640", "2x3", ".jpg", "png", "free", "shipping", "download",
              "click on", "page 3", "-", "_", "—", "“", "’", "`", '"', "'", "...", "*", "(", "]", "/", "\\", "\\n",
              ":", ",", ".", "+", ";", " ", "  ", "\n", "猫", "ｶ", "é", "Ã©", "%20", "+", "A", "Cat", "x", "9", "🐱"]
    rng = random.Random(0)
    fuzz = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(400)]
    assert [t5cache.prepare_caption(c, clean_caption=True) for c in fuzz] == if_preprocessing(fuzz)
    assert t5cache.prepare_caption(" A <b>Cat</b> ", clean_caption=False) == "a <b>cat</b>"  # off: only lower+strip


def test_clean_caption_is_what_the_cache_keys_on(tiny, tmp_path):
    same = ["A <b>Cat</b> at https://example.com/cats/", "a cat at", "@bob a cat at 192.168.1.1"]
    assert {t5cache.prepare_caption(c, clean_caption=True) for c in same} == {"a cat at"}
    stats = t5cache.build_cache([*same, "A Dog"], str(tiny), tmp_path / "c", clean_caption=True, progress=False)
    assert stats["encoded"] == 3  # "a cat at", "a dog", ""
    cache = t5cache.TextCache(tmp_path / "c")
    emb = cache.get([*same, "<i>a dog</i>"])
    ref, _, _ = reference(tiny, ["a cat at", "a dog"])
    assert torch.equal(emb, ref[[0, 0, 0, 1]].bfloat16())  # T5 read the cleaned text
    assert len(cache) == 3 and cache.missing(["a cat at", "a cat at 192.168.1"]) == ["a cat at 192.168.1"]
    with pytest.raises(ValueError, match="clean_caption: cache has True, asked False"):
        t5cache.build_cache(["a cat"], str(tiny), tmp_path / "c", progress=False)


@pytest.mark.parametrize("module", ["bs4", "ftfy"])
def test_clean_caption_without_its_packages_says_what_to_install(tiny, monkeypatch, module):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # as if not installed
    with pytest.raises(ImportError, match=rf"pip install beautifulsoup4 ftfy` \({module} is missing"):
        t5cache.prepare_caption("a cat", clean_caption=True)
    with pytest.raises(ImportError, match="clean_caption=False"):  # before T5 is loaded
        t5cache.TextEncoder(str(tiny), clean_caption=True)
    assert t5cache.prepare_caption(" A Cat", clean_caption=False) == "a cat"
