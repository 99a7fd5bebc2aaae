#!/usr/bin/env bash
# Pin deploy/Dockerfile's base image to the current digest of public.ecr.aws/lambda/python:3.12.
#
#   deploy/pin-base-image.sh            # rewrites the ARG BASE_IMAGE line, prints the digest
#
# The digest is the multi-architecture index's (what `docker pull` of the tag resolves),
# read with the first of skopeo, crane or `docker buildx imagetools` found. Review the
# change, rebuild (`sam build`) and deploy. The lock of Python packages is deploy/lock.py's.
set -euo pipefail

image="public.ecr.aws/lambda/python:3.12"
dockerfile="$(cd "$(dirname "$0")" && pwd)/Dockerfile"

if command -v skopeo >/dev/null; then
  digest="$(skopeo inspect --format '{{.Digest}}' "docker://${image}")"
elif command -v crane >/dev/null; then
  digest="$(crane digest "${image}")"
elif command -v docker >/dev/null; then
  digest="$(docker buildx imagetools inspect "${image}" --format '{{json .Manifest.Digest}}' | tr -d '"')"
else
  echo "need skopeo, crane or docker buildx to resolve ${image}" >&2
  exit 1
fi

if [[ ! "${digest}" =~ ^sha256:[0-9a-f]{64}$ ]]; then
  echo "unexpected digest for ${image}: ${digest}" >&2
  exit 1
fi

sed -i.bak -E "s|^ARG BASE_IMAGE=.*$|ARG BASE_IMAGE=${image}@${digest}|" "${dockerfile}"
rm -f "${dockerfile}.bak"
echo "${image}@${digest}"
