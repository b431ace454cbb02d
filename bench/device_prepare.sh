#!/usr/bin/env bash
# Fill the git-ignored device/ folder that bench/device_run.sh carries to a lent GPU machine, which has no network
# and no apt: the wheels it lacks (diffusers) or may hold in another version (timm: our ViT blocks need 1.0.31's
# attention attributes), the emoji font and Unicode's emoji list. Run it here, then one call on the device:
#
#   bash bench/device_prepare.sh
#   run(command="bash bench/device_run.sh recipe", carry=["device"])   # the device tool; see bench/device_run.sh
#
# Wheels come from ../shared/wheels when it has the pinned version, else from PyPI (pip download, no dependencies:
# the machine has torch, numpy, Pillow, safetensors, huggingface_hub and the rest; ../shared/reference/device-notes.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
shared=../shared/wheels
font=${IJEPA_EMOJI_FONT:-/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf}
emoji_list=${IJEPA_EMOJI_TEST:-/usr/share/unicode/emoji/emoji-test.txt}
mkdir -p device
rm -f device/*.whl
for package in diffusers timm; do
    version=$(sed -n "s/^$package==//p" requirements.txt)
    [ -n "$version" ] || { echo "requirements.txt pins no $package" >&2; exit 1; }
    if compgen -G "$shared/$package-$version-*.whl" > /dev/null; then
        cp "$shared/$package-$version"-*.whl device/
    else
        "$python" -m pip download -q --no-deps --only-binary :all: -d device "$package==$version"
    fi
done
for file in "$font" "$emoji_list"; do
    [ -f "$file" ] || { echo "missing $file: apt-get install fonts-noto-color-emoji unicode-data" >&2; exit 1; }
done
cp "$font" device/NotoColorEmoji.ttf
cp "$emoji_list" device/emoji-test.txt
# the device gets the working tree without .git: the commit the model card names travels with it
code="app.py ijepa decoder train bench requirements.txt"  # as train/runtime.py's CODE_PATHS
echo "$(git rev-parse --short HEAD)$(git status --porcelain --untracked-files=no -- $code | grep -q . \
    && echo ' with local changes')" > device/code_version.txt
ls -l device
# carry takes 64 MiB in all, the working tree included
echo "device/: $(du -sm device | cut -f1) MiB"
