// Injected into browser test pages after harness.js (tests/test_web_client.py). Not part of the
// product: a tiny app on top of our client (/sdk/spaces.js) that records every event, so a
// test can ask what the page saw.
//
// - app.join(token, options): new Space(token, options).join(); every SpaceEvent is recorded
//   in app.events as {event, participant, connection, track: {tid, kind, source, muted}, ...}.
// - every subscribed remote video is watched: app.video() gives, per "<participant id>/<source>",
//   the frames presented (requestVideoFrameCallback) and the colour of each of them, so a test
//   can check that every frame came from the right sender.
"use strict";
window.app = (() => {
  const events = [];
  const videos = new Map();
  let sdk = null;
  let space = null;
  let local = null;
  const tracks = {};

  async function load() {
    if (!sdk) sdk = await import("/sdk/spaces.js");
    return sdk;
  }

  function describe(track) {
    return (
      track && {
        tid: track.tid,
        kind: track.kind,
        source: track.source,
        muted: track.muted,
        hasMedia: track.hasMedia(),
      }
    );
  }

  function record(name, args) {
    const entry = { event: name, at: performance.now() };
    for (const arg of args) {
      if (arg instanceof sdk.Track) entry.track = describe(arg);
      else if (arg instanceof sdk.RemoteParticipant || arg instanceof sdk.LocalParticipant) {
        entry.participant = arg.id;
        entry.connection = arg.connectionId;
        entry.displayName = arg.displayName;
      } else if (arg instanceof Error) entry.error = { name: arg.name, message: arg.message, code: arg.code };
      else if (Array.isArray(arg)) entry.speakers = arg.map((s) => s.participant.id);
      else if (arg && typeof arg === "object" && "sequenceNumber" in arg) entry.custom = { ...arg };
      else if (typeof arg === "boolean") entry.value = arg;
    }
    events.push(entry);
  }

  // Sample the centre of every presented frame: [r, g, b] per frame.
  function watch(key, mediaStreamTrack) {
    const video = document.createElement("video");
    video.muted = true;
    video.autoplay = true;
    video.playsInline = true;
    video.srcObject = new MediaStream([mediaStreamTrack]);
    document.body.appendChild(video);
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 4;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    const entry = { frames: 0, colors: [], firstFrameAt: 0, video };
    const previous = videos.get(key);
    if (previous) previous.video.remove();
    videos.set(key, entry);
    const onFrame = () => {
      if (videos.get(key) !== entry) return;
      entry.frames += 1;
      if (!entry.firstFrameAt) entry.firstFrameAt = performance.now();
      // The very first callback may come before the element holds the frame (readyState 0):
      // such a frame is counted, and not sampled.
      const w = video.videoWidth;
      const h = video.videoHeight;
      if (w && h && video.readyState >= 2) {
        ctx.drawImage(video, w / 2 - 2, h / 2 - 2, 4, 4, 0, 0, 4, 4);
        const d = ctx.getImageData(2, 2, 1, 1).data;
        entry.colors.push([d[0], d[1], d[2]]);
      }
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
    video.play().catch(() => {});
  }

  async function join(token, options = {}) {
    const { Space, SpaceEvent, TrackKind } = await load();
    space = new Space(token, options);
    for (const name of Object.values(SpaceEvent)) space.on(name, (...args) => record(name, args));
    space.on(SpaceEvent.ParticipantTrackSubscribed, (participant, track) => {
      if (track.kind === TrackKind.Video) watch(`${participant.id}/${track.source}`, track.track);
    });
    try {
      local = await space.join();
    } catch (error) {
      return {
        error: {
          name: error.name,
          message: error.message,
          code: error.code,
          fatal: error.fatal,
          retry: error.retry,
        },
      };
    }
    return { participantId: local.id, connectionId: local.connectionId, role: local.role };
  }

  async function publish(what = { audio: true, video: true }) {
    const s = await load();
    const made = what.screen ? await s.getDisplayMedia({ video: true }) : await s.getUserMedia(what);
    try {
      await local.publishTracks(made);
    } catch (error) {
      return { error: { name: error.name, message: error.message, code: error.code } };
    }
    for (const track of made) tracks[track.source] = track;
    return made.map(describe);
  }

  async function call(fn) {
    try {
      return { ok: await fn() };
    } catch (error) {
      return { error: { name: error.name, message: error.message, code: error.code } };
    }
  }

  function frames() {
    const out = {};
    for (const [key, e] of videos) out[key] = e.frames;
    return out;
  }

  function video() {
    const out = {};
    for (const [key, e] of videos)
      out[key] = { frames: e.frames, colors: e.colors, firstFrameAt: e.firstFrameAt };
    return out;
  }

  return {
    join,
    publish,
    call,
    video,
    frames,
    events,
    tracks,
    get space() {
      return space;
    },
    get local() {
      return local;
    },
    seen: (name) => events.filter((e) => e.event === name),
  };
})();
