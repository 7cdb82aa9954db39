# run_qwen2_audio on the vllm-ascend image (Atlas 800I A2 by default).
# A3: quay.io/ascend/vllm-ascend:v0.23.0-a3; 300I Duo: v0.23.0-310p;
# openEuler hosts: v0.23.0-openeuler, v0.23.0-a3-openeuler, v0.23.0-310p-openeuler.
ARG BASE_IMAGE=quay.io/ascend/vllm-ascend:v0.23.0
FROM ${BASE_IMAGE}

WORKDIR /workspace
COPY requirements.txt /tmp/run_qwen2_audio/requirements.txt

# Install the audio packages, and fail the build if that touched the image's
# own vllm, vllm-ascend, torch or torch-npu (they are matched to CANN/driver).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pinned() { pip list --format=freeze 2>/dev/null \
        | grep -iE '^(vllm|vllm[-_]ascend|torch|torch[-_]npu)==' | sort; } \
    && pinned > /tmp/run_qwen2_audio/before.txt \
    && pip install --no-cache-dir -r /tmp/run_qwen2_audio/requirements.txt \
    && pinned > /tmp/run_qwen2_audio/after.txt \
    && diff -u /tmp/run_qwen2_audio/before.txt /tmp/run_qwen2_audio/after.txt \
    && test -s /tmp/run_qwen2_audio/before.txt

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
