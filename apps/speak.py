"""Speak a sentence and retrieve the images it describes, with a trained m6 audio model.

    python -m apps.speak "a red circle to the left of a small blue square" -k 8
    python -m apps.speak "two green stars" --voice en-gb-scotland+f2 --speed 150
    python -m apps.speak --wav my_recording.wav -k 5          # a recording instead of espeak-ng

The sentence is spoken by espeak-ng (16 kHz with 20 dB of white noise by default: the spoken
world's pipeline, which is all the model has heard; ``--snr``, ``--clean``), or a WAV/FLAC
file is read and resampled. The audio model (default ``runs/m6/checkpoint.pt``, written by
``python grader.py m6``) embeds the sound into its CLIP's space and transcribes it; the CLIP's
Faiss index of the gallery (:func:`apps.retrieve.open_index`: the world's test split by default,
built when absent) returns the nearest images. Prints what was heard and the top-k, and writes a
PNG grid (default ``<checkpoint dir>/speak/<sentence>.png``; an existing ``--out`` is replaced
only with ``--force``). Every option is checked before a model is loaded: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from apps.cli import ArgumentParser, fail, positive_int, unwritable, would_overwrite
from apps.index import IndexProblem, IndexSpec
from apps.retrieve import RetrieveError, find_checkpoint, open_index, save_results_figure
from mmsys.checkpoint import CheckpointError, config_errors
from mmsys.data.split import DataMissingError

DEFAULT_CHECKPOINT = Path("runs/m6/checkpoint.pt")


def spoken(text: str, voice: str, speed: int, pitch: int, snr_db: float | None) -> torch.Tensor:
    """``text`` spoken by espeak-ng: (T,) float32 in [-1, 1] at 16 kHz, with white noise at
    ``snr_db`` (seeded; None: clean) as in the spoken world the model was trained on."""
    from mmsys.audio.waves import dequantise
    from mmsys.data.speech import SpeechConfig, espeak_path, render_utterance
    spec = {"text": text, "voice": voice, "speed": speed, "pitch": pitch, "noise_seed": 0, "snr_db": snr_db}
    return dequantise(render_utterance(spec, SpeechConfig(), espeak_path()))


@torch.no_grad()
def listen(model, tok, wave: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(T,) waveform -> ((1, E) embedding in the CLIP space, the greedy transcript)."""
    w, n = wave[None], torch.tensor([len(wave)])
    return model.encode_audio(w, n), tok.decode(model.greedy(w, n)[0].tolist())


def main(argv=None) -> int:
    from mmsys.data.speech import VARIANTS, VOICES, SpeechConfig
    p = ArgumentParser(prog="python -m apps.speak", description=__doc__.split("\n\n")[0])
    p.add_argument("text", nargs="?", help="the sentence to speak, e.g. 'a red circle on the left'")
    p.add_argument("--wav", type=Path, default=None, help="a WAV/FLAC recording to use instead of speaking")
    p.add_argument("-k", type=positive_int, default=8, help="how many images (default 8)")
    p.add_argument("--voice", default="en-us", help=f"espeak-ng voice: one of {', '.join(VOICES)}, optionally "
                   f"with a variant ({', '.join(v for v in VARIANTS if v)}); default en-us")
    p.add_argument("--speed", type=int, default=170, help="words per minute, 80-450 (default 170)")
    p.add_argument("--pitch", type=int, default=50, help="0-99 (default 50)")
    p.add_argument("--snr", type=float, default=SpeechConfig().snr_db,
                   help=f"background noise in dB SNR, as the spoken world has (default {SpeechConfig().snr_db:g}); "
                        "the model never heard clean speech")
    p.add_argument("--clean", action="store_true", help="no added noise")
    p.add_argument("--checkpoint", type=Path, default=None, help=f"m6 audio checkpoint (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--out", type=Path, default=None,
                   help="PNG to write (default <checkpoint dir>/speak/<sentence>.png, replaced by the same sentence)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    a = p.parse_args(argv)
    try:
        if (a.text is None) == (a.wav is None):
            raise RetrieveError("give either a sentence to speak or --wav FILE (not both)")
        if a.text is not None and not a.text.strip():
            raise RetrieveError("the sentence is empty: type what to say, e.g. 'a red circle on the left'")
        if a.wav is not None and not a.wav.is_file():
            raise RetrieveError(f"--wav {a.wav}: no such file")
        base = a.voice.split("+")[0]
        if base not in VOICES or (a.voice != base and a.voice[len(base):] not in VARIANTS):
            raise RetrieveError(f"--voice {a.voice}: use one of {', '.join(VOICES)}, optionally with "
                                f"{', '.join(v for v in VARIANTS if v)}")
        if not 80 <= a.speed <= 450:
            raise RetrieveError(f"--speed {a.speed}: give 80-450 words per minute")
        if not 0 <= a.pitch <= 99:
            raise RetrieveError(f"--pitch {a.pitch}: give 0-99")
        if not -20 <= a.snr <= 100:
            raise RetrieveError(f"--snr {a.snr:g}: give a signal-to-noise ratio of -20 to 100 dB (or --clean)")
        path = find_checkpoint(a.checkpoint, DEFAULT_CHECKPOINT, "audio", "m6")
        slug = re.sub(r"[^a-z0-9]+", "_", (a.text or a.wav.stem).lower()).strip("_")[:60] or "query"
        out = a.out or path.parent / "speak" / f"{slug}.png"
        problem = unwritable(out, "--out", create_parents=True) or (a.out and would_overwrite([a.out], a.force))
        if problem:
            raise RetrieveError(problem)
        if a.wav is not None:
            from mmsys.data.audio_folder import read_audio
            try:
                wave = read_audio(a.wav)
            except Exception as e:  # soundfile: not a sound file, or an unknown format
                raise RetrieveError(f"--wav {a.wav}: cannot be read as audio ({e}); give a WAV or FLAC file") from None
        else:
            wave = spoken(a.text, a.voice, a.speed, a.pitch, None if a.clean else a.snr)
        from mmsys.audio.model import load_audio_model
        from mmsys.clip import load_clip
        from mmsys.text import Tokenizer
        model, ck = load_audio_model(path)
        clip_path = path.parent / ck["extra"]["clip_checkpoint"]
        if not clip_path.is_file():
            raise RetrieveError(f"{path} was bound to the CLIP {clip_path}, which is missing: re-run "
                                f"`python grader.py m6`")
        clip, _, clip_ck = load_clip(clip_path)
        with config_errors(path, "extra['tokenizer']"):
            tok = Tokenizer.from_state_dict(ck["extra"]["tokenizer"])
        index = open_index(clip, tok, clip_ck, clip_path, IndexSpec(kind="flat"), progress=sys.stderr.isatty())
        emb, heard = listen(model, tok, wave)
        k = min(a.k, len(index.gallery))
        scores, ids = index.text_to_image(emb, k)  # the audio embedding searches the image index
        ids_, scores_ = ids[0].tolist(), scores[0].tolist()
        said = a.text if a.text is not None else str(a.wav)
        captions = [index.gallery.captions[i] for i in ids_]
        save_results_figure(f"said: {said}  |  heard: {heard}", None, index.gallery.images[ids[0]], scores_,
                            captions, out)
    except (RetrieveError, IndexProblem, CheckpointError, DataMissingError) as e:
        return fail(str(e))
    print(f"said:  {said}\nheard: {heard}")
    for r, (i, s, c) in enumerate(zip(ids_, scores_, captions), 1):
        print(f"{r:3d}. image {i:5d}  cos {s:.3f}  {c}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
