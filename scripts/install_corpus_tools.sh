#!/usr/bin/env bash
# Install the Debian tools scripts/build_corpus.py uses (speech sources and codecs); with --multilingual
# also the real voices and the other languages' festival voices scripts/build_multilingual.py uses.
# Only the Debian archive is contacted. A package the archive lacks is reported and skipped;
# build_corpus.py records which sources and encoders it could not find.
set -u
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive

$SUDO apt-get update -q || echo "warning: apt-get update failed" >&2

PKGS=(
  asterisk-core-sounds-en-wav   # 8 kHz English studio prompts (only 'en' is allowed)
  espeak-ng                     # formant synthesis, 22.05 kHz
  festival                      # diphone / HTS synthesis
  festvox-kallpc16k festvox-kdlpc16k  # festival diphone voices, 16 kHz
  festvox-us-slt-hts            # festival HTS voice, 32 kHz
  flite                         # small CMU synthesizer, 8/16 kHz
  ffmpeg                        # codecs
  libavcodec-extra              # AMR-NB/WB encoders for ffmpeg
  sox libsox-fmt-all            # resampling / effects
  alsa-utils                    # /usr/share/sounds/alsa (48 kHz words)
)
if [ "${1:-}" = "--multilingual" ]; then
  PKGS+=(
    klettres-data                 # native speakers of ~20 languages, 44.1 kHz (reserved ones are never read)
    festvox-czech-dita festvox-czech-krb festvox-czech-machac festvox-czech-ph
    festvox-suopuhe-lj festvox-suopuhe-mv   # Finnish
    festvox-ca-ona-hts            # Catalan
  )
fi

missing=()
for p in "${PKGS[@]}"; do
  case "$p" in \#*) continue;; esac
  if ! $SUDO apt-get install -y -q --no-install-recommends "$p" >/dev/null 2>&1; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install_corpus_tools: could not install: ${missing[*]} (build_corpus.py skips what is absent)" >&2
else
  echo "install_corpus_tools: all packages installed"
fi
exit 0
