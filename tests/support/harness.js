// Injected into every browser test page (tests/support/browser.py). Not part of the product.
//
// - setColor(r, g, b): getUserMedia's video becomes a synthetic camera painting that colour
//   (with a moving bar, so every frame is new), so receivers can tell senders apart.
// - watch(key, element): count the frames a <video> presents (requestVideoFrameCallback) and
//   sample the colour at its centre.
// - stats(): {key: {frames, color: [r, g, b], width, height}} of everything watched.
// - setCamera({width, height, fps, busy}): the synthetic camera's size and rate; busy paints
//   shifting noise around the colour, so an encoder needs its whole bitrate (simulcast tests).
// - rtpStats(): the video inbound-rtp and outbound-rtp stats of every peer connection the page
//   made (each outbound entry per simulcast layer, with its rid).
// - audioStats(): the same for audio, with each stream's codec (mime type, payload type, fmtp).
// - sendEncodings(): the encodings (getParameters) of every video sender the page made.
// - localCandidateAddresses(): the sorted distinct addresses of every local ICE candidate in the
//   getStats() of every peer connection the page made (the tests assert ["127.0.0.1"]).
"use strict";
window.harness = (() => {
  const watched = new Map();
  const events = [];
  let color = [128, 128, 128];
  let realGetUserMedia = null;
  let camera = { width: 640, height: 360, fps: 30, busy: false };

  function setCamera(options) {
    camera = { ...camera, ...options };
  }

  function noiseTile(size) {
    const tile = document.createElement("canvas");
    tile.width = tile.height = size;
    const tctx = tile.getContext("2d");
    const image = tctx.createImageData(size, size);
    for (let i = 0; i < image.data.length; i += 4) {
      const v = Math.floor(Math.random() * 256);
      image.data[i] = v;
      image.data[i + 1] = (v * 7) & 255;
      image.data[i + 2] = (v * 13) & 255;
      image.data[i + 3] = 255;
    }
    tctx.putImageData(image, 0, 0);
    return tile;
  }

  function syntheticCamera(width, height, fps, busy) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    const tile = busy ? noiseTile(32) : null;
    let tick = 0;
    const paint = () => {
      if (tile) {
        // Blurred noise shifted every frame: little to predict, so each layer uses its bitrate.
        const dx = Math.floor(Math.random() * 256);
        const dy = Math.floor(Math.random() * 256);
        for (let x = -dx; x < width; x += 256) {
          for (let y = -dy; y < height; y += 256) ctx.drawImage(tile, x, y, 256, 256);
        }
        ctx.fillStyle = `rgb(${color[0]},${color[1]},${color[2]})`;
        ctx.fillRect(width / 4, height / 4, width / 2, height / 2);
      } else {
        ctx.fillStyle = `rgb(${color[0]},${color[1]},${color[2]})`;
        ctx.fillRect(0, 0, width, height);
      }
      ctx.fillStyle = "rgb(255,255,255)";
      ctx.fillRect((tick * 8) % width, height - 16, 32, 16);
      tick += 1;
    };
    paint();
    setInterval(paint, Math.round(1000 / fps));
    return canvas.captureStream(fps).getVideoTracks()[0];
  }

  const peerConnections = [];
  const RealPeerConnection = window.RTCPeerConnection;
  window.RTCPeerConnection = class RecordingPeerConnection extends RealPeerConnection {
    constructor(...args) {
      super(...args);
      peerConnections.push(this);
    }
  };

  async function rtpStats() {
    const inbound = [];
    const outbound = [];
    for (const pc of peerConnections) {
      if (pc.connectionState === "closed") continue;
      const report = await pc.getStats();
      for (const s of report.values()) {
        if (s.kind !== "video") continue;
        if (s.type === "inbound-rtp") {
          inbound.push({
            mid: s.mid,
            trackIdentifier: s.trackIdentifier,
            frameWidth: s.frameWidth || 0,
            frameHeight: s.frameHeight || 0,
            framesDecoded: s.framesDecoded || 0,
            freezeCount: s.freezeCount || 0,
            totalFreezesDuration: s.totalFreezesDuration || 0,
            pliCount: s.pliCount || 0,
            bytesReceived: s.bytesReceived || 0,
            packetsLost: s.packetsLost || 0,
          });
        } else if (s.type === "outbound-rtp") {
          outbound.push({
            mid: s.mid,
            rid: s.rid || "",
            active: s.active,
            frameWidth: s.frameWidth || 0,
            framesEncoded: s.framesEncoded || 0,
            bytesSent: s.bytesSent || 0,
            qualityLimitationReason: s.qualityLimitationReason || "",
          });
        }
      }
    }
    return { inbound, outbound, at: performance.now() };
  }

  // The audio inbound-rtp and outbound-rtp stats of every peer connection the page has, and
  // the payload types each inbound stream's codec was negotiated with.
  async function audioStats() {
    const inbound = [];
    const outbound = [];
    for (const pc of peerConnections) {
      if (pc.connectionState === "closed") continue;
      const report = await pc.getStats();
      for (const s of report.values()) {
        if (s.kind !== "audio") continue;
        const codec = s.codecId ? report.get(s.codecId) : undefined;
        const common = {
          mid: s.mid,
          mimeType: codec ? codec.mimeType : "",
          payloadType: codec ? codec.payloadType : -1,
          sdpFmtpLine: codec ? codec.sdpFmtpLine || "" : "",
        };
        if (s.type === "inbound-rtp") {
          inbound.push({
            ...common,
            packetsReceived: s.packetsReceived || 0,
            packetsLost: s.packetsLost || 0,
            jitter: s.jitter || 0,
            audioLevel: s.audioLevel,
            totalAudioEnergy: s.totalAudioEnergy || 0,
            totalSamplesReceived: s.totalSamplesReceived || 0,
            concealedSamples: s.concealedSamples || 0,
            silentConcealedSamples: s.silentConcealedSamples || 0,
            concealmentEvents: s.concealmentEvents || 0,
          });
        } else if (s.type === "outbound-rtp") {
          outbound.push({ ...common, packetsSent: s.packetsSent || 0 });
        }
      }
    }
    return { inbound, outbound, at: performance.now() };
  }

  function sendEncodings() {
    const out = [];
    for (const pc of peerConnections) {
      if (pc.connectionState === "closed") continue;
      for (const sender of pc.getSenders()) {
        if (!sender.track || sender.track.kind !== "video") continue;
        out.push(
          sender.getParameters().encodings.map((e) => ({
            rid: e.rid || "",
            active: e.active,
            maxBitrate: e.maxBitrate || 0,
            scaleResolutionDownBy: e.scaleResolutionDownBy || 1,
          })),
        );
      }
    }
    return out;
  }

  // Every local candidate each open peer connection gathered, as getStats() reports it; a
  // connection with none (or with an address-less candidate) is reported too, so that a check
  // for "127.0.0.1 only" cannot pass on nothing.
  async function localCandidateAddresses() {
    const addresses = new Set();
    let open = 0;
    for (const pc of peerConnections) {
      if (pc.connectionState === "closed") continue;
      open += 1;
      const report = await pc.getStats();
      let found = 0;
      for (const s of report.values()) {
        if (s.type !== "local-candidate") continue;
        found += 1;
        addresses.add(s.address || s.ip || `(no address: ${s.candidateType} ${s.protocol})`);
      }
      if (!found) addresses.add("(a peer connection without local candidates)");
    }
    if (!open) addresses.add("(no open peer connection)");
    return [...addresses].sort();
  }

  // The local UDP port of each peer connection that receives video (its nominated pair).
  async function receivingPorts() {
    const ports = [];
    for (const pc of peerConnections) {
      if (pc.connectionState === "closed") continue;
      const report = await pc.getStats();
      const stats = [...report.values()];
      if (!stats.some((s) => s.type === "inbound-rtp" && s.kind === "video")) continue;
      const transport = stats.find((s) => s.type === "transport" && s.selectedCandidatePairId);
      const pair = transport && report.get(transport.selectedCandidatePairId);
      const local = pair && report.get(pair.localCandidateId);
      if (local) ports.push(local.port);
    }
    return ports;
  }

  function setColor(r, g, b) {
    color = [r, g, b];
    if (realGetUserMedia) return;
    realGetUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
    navigator.mediaDevices.getUserMedia = async (constraints) => {
      const stream = new MediaStream();
      if (constraints && constraints.audio) {
        const audio = await realGetUserMedia({ audio: true });
        audio.getAudioTracks().forEach((t) => stream.addTrack(t));
      }
      if (constraints && constraints.video) {
        stream.addTrack(syntheticCamera(camera.width, camera.height, camera.fps, camera.busy));
      }
      return stream;
    };
  }

  function sample(video, entry) {
    if (!video.videoWidth) return;
    const canvas = entry.canvas || (entry.canvas = document.createElement("canvas"));
    canvas.width = 16;
    canvas.height = 16;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    const sx = Math.max(0, video.videoWidth / 2 - 8);
    const sy = Math.max(0, video.videoHeight / 4 - 8);
    ctx.drawImage(video, sx, sy, 16, 16, 0, 0, 16, 16);
    const d = ctx.getImageData(8, 8, 1, 1).data;
    entry.color = [d[0], d[1], d[2]];
    entry.width = video.videoWidth;
    entry.height = video.videoHeight;
  }

  function watch(key, video) {
    const entry = { frames: 0, color: null, width: 0, height: 0, firstFrameAt: 0, times: [], video };
    watched.set(key, entry);
    video.muted = true;
    video.autoplay = true;
    video.playsInline = true;
    if (!video.isConnected) document.body.appendChild(video);
    video.play().catch(() => {});
    const onFrame = () => {
      if (watched.get(key) !== entry) return;
      entry.frames += 1;
      const now = performance.now();
      if (!entry.firstFrameAt) entry.firstFrameAt = now;
      entry.times.push(now);
      if (entry.times.length > 600) entry.times.shift();
      if (entry.frames % 5 === 1) sample(video, entry);
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
    return entry;
  }

  function unwatch(key) {
    watched.delete(key);
  }

  function watchTrack(key, mediaStreamTrack) {
    const video = document.createElement("video");
    video.srcObject = new MediaStream([mediaStreamTrack]);
    return watch(key, video);
  }

  // When the n-th frame presented after page time t arrived (for key), or 0 if not yet.
  function nthFrameAfter(key, t, n) {
    const entry = watched.get(key);
    if (!entry) return 0;
    const after = entry.times.filter((x) => x > t);
    return after.length >= n ? after[n - 1] : 0;
  }

  function stats() {
    const out = {};
    for (const [key, e] of watched) {
      out[key] = { frames: e.frames, color: e.color, width: e.width, height: e.height, firstFrameAt: e.firstFrameAt };
    }
    return out;
  }

  function record(kind, detail) {
    events.push({ kind, detail, at: performance.now() });
  }

  // Every WebSocket message in both directions, and every socket's close code.
  const wire = [];
  const RealWebSocket = window.WebSocket;
  class RecordingWebSocket extends RealWebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      wire.push({ dir: "open", url: String(url), at: performance.now() });
      this.addEventListener("message", (e) => wire.push({ dir: "in", data: String(e.data), at: performance.now() }));
      this.addEventListener("close", (e) => wire.push({ dir: "close", code: e.code, at: performance.now() }));
    }
    send(data) {
      wire.push({ dir: "out", data: String(data), at: performance.now() });
      return super.send(data);
    }
  }
  window.WebSocket = RecordingWebSocket;

  function messages(dir, key) {
    return wire
      .filter((m) => m.dir === dir)
      .map((m) => JSON.parse(m.data))
      .filter((m) => !key || m[key] !== undefined);
  }

  return { setColor, setCamera, rtpStats, audioStats, sendEncodings, receivingPorts, localCandidateAddresses, watch, unwatch, watchTrack, stats, nthFrameAfter, record, events, watched, wire, messages };
})();
