// Spaces browser client: an ES module with no build step and no dependencies, typed by
// spaces.d.ts. It speaks the WebSocket protocol of Mux's web SDK (@mux/spaces-web 1.2.0), and
// its API follows that SDK's names, so moving an app from Mux is a change of import:
//
//   import { Space, SpaceEvent, getUserMedia } from "https://your-spaces-host/sdk/spaces.js";
//
// The protocol (docs/architecture.md, "Browsers"): one WebSocket to <backend>/v1 carrying JSON
// messages; a publishing peer connection offered by the client (one sendonly m-section per
// track, announced by `pending_track` with its mid before each offer) and a subscribing peer
// connection offered by the server (each m-section's msid names the track it carries).
//
// Reconnects as Mux's SDK does: after any close but 4000 once joined, up to 5 attempts, the
// first at once and then 5 s apart, each with reconnect_id=<participant id>; the tracks are
// published again with the same ids on a new peer connection. A close with 4000 (removed,
// space deleted, replaced) or an error with fatal && !retry ends the session for good, and
// emits SpaceEvent.LocalParticipantDisconnected (our own event: Mux's SDK says nothing then).

const SDK_VERSION = "spaces-js-1.0.0";
const CLOSE_NO_RECONNECT = 4000;
const CLOSE_RECONNECT = 4001;
const RECONNECT_ATTEMPTS = 5;
const RECONNECT_DELAY_MS = 5000;
const CONNECT_TIMEOUT_MS = 15000;
const NEGOTIATION_TIMEOUT_MS = 15000;
const REQUEST_TIMEOUT_MS = 30000;

/** Events a {@link Space} emits (Mux's names, plus LocalParticipantDisconnected). */
export const SpaceEvent = Object.freeze({
  LocalParticipantReconnecting: "LocalParticipantReconnecting",
  LocalParticipantReconnected: "LocalParticipantReconnected",
  LocalParticipantReconnectFailed: "LocalParticipantReconnectFailed",
  /** Spaces only: the server ended this session for good (close code 4000: removed, space
   * deleted, replaced by another connection). args: (DisconnectedError). */
  LocalParticipantDisconnected: "LocalParticipantDisconnected",
  ParticipantJoined: "ParticipantJoined",
  ParticipantLeft: "ParticipantLeft",
  ParticipantTrackPublished: "ParticipantTrackPublished",
  ParticipantTrackUnpublished: "ParticipantTrackUnpublished",
  ParticipantTrackSubscribed: "ParticipantTrackSubscribed",
  ParticipantTrackUnsubscribed: "ParticipantTrackUnsubscribed",
  ParticipantTrackMuted: "ParticipantTrackMuted",
  ParticipantTrackUnmuted: "ParticipantTrackUnmuted",
  ActiveSpeakersChanged: "ActiveSpeakersChanged",
  BroadcastStateChanged: "BroadcastStateChanged",
  ParticipantCustomEventPublished: "ParticipantCustomEventPublished",
  ParticipantDisplayNameChanged: "ParticipantDisplayNameChanged",
  /** Spaces only: this page's link cannot carry even the lowest video layers, so it receives
   * audio only (true), or video resumed (false). args: (active: boolean, estimatedBitrate). */
  AudioOnlyChanged: "AudioOnlyChanged",
});

/** What {@link Space.setVideoQuality} may ask of a remote video track. */
export const VideoQuality = Object.freeze({
  Low: "low",
  Medium: "medium",
  High: "high",
  Off: "off",
  /** No limit: the best layer the link carries. */
  Auto: "",
});

/** Events a {@link RemoteParticipant} or {@link LocalParticipant} emits. */
export const ParticipantEvent = Object.freeze({
  TrackMuted: "TrackMuted",
  TrackUnmuted: "TrackUnmuted",
  TrackPublished: "TrackPublished",
  TrackUnpublished: "TrackUnpublished",
  TrackSubscribed: "TrackSubscribed",
  TrackUnsubscribed: "TrackUnsubscribed",
  StartedSpeaking: "StartedSpeaking",
  StoppedSpeaking: "StoppedSpeaking",
  CustomEventPublished: "CustomEventPublished",
  DisplayNameChanged: "DisplayNameChanged",
});

/** Events a {@link Track} emits. */
export const TrackEvent = Object.freeze({ Muted: "Muted", Unmuted: "Unmuted" });

export const TrackKind = Object.freeze({ Audio: 1, Video: 2 });
export const TrackSource = Object.freeze({
  Camera: "camera",
  Microphone: "microphone",
  Screenshare: "screenshare",
  ScreenshareAudio: "screenshareaudio",
  Other: "other",
});
export const SubscriptionMode = Object.freeze({ Automatic: "AUTOMATIC", Manual: "MANUAL" });
export const ParticipantRole = Object.freeze({ Publisher: 1, Subscriber: 2 });
export const ParticipantStatus = Object.freeze({ Connected: 1, Disconnected: 2, Reconnected: 3 });
export const CustomEventScope = Object.freeze({ UNKNOWN: 0, SESSION: 1 });

/** The server's error types before and outside requests (`error.code` of a join error). */
export const JoinErrorType = Object.freeze({
  Unknown: 0,
  Disconnected: 1,
  HitTimeLimit: 2,
  DuplicateParticipantRejected: 3,
  PeerConnectionClosed: 4,
  InvalidPendingTrack: 5,
  InvalidJWT: 6,
  ParticipantLimitReached: 7,
});

/** The server's error types for a request (`error.code` of a request's error). */
export const RequestErrorType = Object.freeze({
  Unknown: 0,
  PendingTrackError: 1,
  TrackMuteError: 2,
  SubscribeTracksError: 3,
  UnsubscribeTracksError: 4,
  CustomEventError: 5,
  CustomEventRateLimited: 6,
  SetDisplayNameError: 7,
  SetDisplayNameRateLimited: 8,
  InvalidProtocolVersion: 9,
});

// --- errors ---------------------------------------------------------------------------------

/** Every error of this client. `code` is the server's error type (or a close code for
 * DisconnectedError); `fatal` and `retry` are the server's flags; `message` is its message. */
export class MuxError extends Error {
  constructor(message, { code = 0, fatal = false, retry = false } = {}) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    this.fatal = fatal;
    this.retry = retry;
  }
}
export { MuxError as SpacesError };
/** The token was refused (error types 3 and 6: a duplicate participant_id, a bad token, an
 * unknown space). */
export class JWTError extends MuxError {}
/** Joining failed for another reason (7: the space is full; the server unreachable). */
export class ConnectionError extends MuxError {}
/** The session ended: for good (close code 4000) or after every reconnect attempt failed. */
export class DisconnectedError extends MuxError {}
export class InternalError extends MuxError {}
export class SpaceOptionsError extends MuxError {}
export class PublishTrackError extends MuxError {}
export class UnpublishTrackError extends MuxError {}
export class PublishCustomEventError extends MuxError {}
export class SetDisplayNameError extends MuxError {}
export class SubscriptionError extends MuxError {}
export class RequestTimeoutError extends MuxError {}

function flags(error) {
  return { code: error.type ?? 0, fatal: !!error.fatal, retry: !!error.retry };
}

function joinError(error) {
  const message = error.message || "the server refused the connection";
  const Kind = error.type === 3 || error.type === 6 ? JWTError : ConnectionError;
  return new Kind(message, flags(error));
}

// --- events ---------------------------------------------------------------------------------

/** A small event emitter with Node's method names (Mux's classes extend Node's). */
class Emitter {
  #listeners = new Map();

  on(event, listener) {
    const list = this.#listeners.get(event) ?? [];
    this.#listeners.set(event, [...list, listener]);
    return this;
  }

  addListener(event, listener) {
    return this.on(event, listener);
  }

  once(event, listener) {
    const wrapped = (...args) => {
      this.off(event, wrapped);
      listener(...args);
    };
    wrapped.listener = listener;
    return this.on(event, wrapped);
  }

  off(event, listener) {
    const list = this.#listeners.get(event) ?? [];
    this.#listeners.set(
      event,
      list.filter((l) => l !== listener && l.listener !== listener),
    );
    return this;
  }

  removeListener(event, listener) {
    return this.off(event, listener);
  }

  removeAllListeners(event) {
    if (event === undefined) this.#listeners.clear();
    else this.#listeners.delete(event);
    return this;
  }

  listenerCount(event) {
    return (this.#listeners.get(event) ?? []).length;
  }

  /** A listener that throws is reported, and never breaks the client's own state. */
  emit(event, ...args) {
    const list = this.#listeners.get(event) ?? [];
    for (const listener of list) {
      try {
        listener(...args);
      } catch (error) {
        (globalThis.reportError ?? console.error)(error);
      }
    }
    return list.length > 0;
  }
}

// --- tracks ---------------------------------------------------------------------------------

function newTrackId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A participant's audio or video track. */
export class Track extends Emitter {
  constructor({ tid, kind, source, name = "", muted = false, width = 0, height = 0 }) {
    super();
    this.tid = tid;
    this.kind = kind;
    this.source = source;
    this.name = name;
    this.muted = muted;
    this.width = width;
    this.height = height;
    /** @type {MediaStreamTrack | undefined} */
    this.track = undefined;
    /** @type {HTMLMediaElement[]} */
    this.attachedElements = [];
  }

  isMuted() {
    return this.muted;
  }

  getSource() {
    return this.source;
  }

  getKind() {
    return this.kind;
  }

  hasMedia() {
    return !!this.track && this.track.readyState === "live";
  }

  /** Show or play this track in `element` (a new <video> or <audio> when omitted). The element
   * follows the track: it gets the media when it arrives, again after a reconnect. */
  attach(element) {
    const el = element ?? document.createElement(this.kind === TrackKind.Video ? "video" : "audio");
    el.autoplay = true;
    if ("playsInline" in el) el.playsInline = true;
    if (!this.attachedElements.includes(el)) this.attachedElements.push(el);
    this._bind(el);
    return el;
  }

  /** Detach from `element`, or from every attached element; returns the detached elements. */
  detach(element) {
    const elements = element ? [element] : [...this.attachedElements];
    for (const el of elements) {
      el.srcObject = null;
      this.attachedElements = this.attachedElements.filter((e) => e !== el);
    }
    return elements;
  }

  _bind(el) {
    const current = el.srcObject?.getTracks?.()[0];
    if (this.track && current === this.track) return;
    el.srcObject = this.track ? new MediaStream([this.track]) : null;
    if (this.track) el.play?.().catch(() => {});
  }

  _setMedia(mediaStreamTrack) {
    this.track = mediaStreamTrack;
    for (const el of this.attachedElements) this._bind(el);
  }

  _setMuted(muted) {
    if (this.muted === muted) return false;
    this.muted = muted;
    this.emit(muted ? TrackEvent.Muted : TrackEvent.Unmuted);
    return true;
  }
}

/** A track this page captures and may publish. */
export class LocalTrack extends Track {
  /**
   * @param {MediaStreamTrack} mediaStreamTrack
   * @param {{source?: string, name?: string}} [options] the source defaults to camera for
   *   video and microphone for audio.
   */
  constructor(mediaStreamTrack, { source, name } = {}) {
    const kind = mediaStreamTrack.kind === "audio" ? TrackKind.Audio : TrackKind.Video;
    const settings = mediaStreamTrack.getSettings?.() ?? {};
    super({
      tid: newTrackId(),
      kind,
      source: source ?? (kind === TrackKind.Video ? TrackSource.Camera : TrackSource.Microphone),
      name: name ?? mediaStreamTrack.label ?? "",
      muted: !mediaStreamTrack.enabled,
      width: settings.width ?? 0,
      height: settings.height ?? 0,
    });
    this.track = mediaStreamTrack;
    this.deviceId = settings.deviceId;
    /** @type {((track: LocalTrack, muted: boolean) => void) | null} set while published */
    this._onMuteChange = null;
  }

  /** Stop sending media (the track stays published; others see it muted). */
  mute() {
    this.track.enabled = false;
    if (this._setMuted(true)) this._onMuteChange?.(this, true);
  }

  unMute() {
    this.track.enabled = true;
    if (this._setMuted(false)) this._onMuteChange?.(this, false);
  }

  /** Stop capturing (the camera light goes off). */
  stop() {
    this.track.stop();
  }

  _declaration(mid) {
    return {
      tid: this.tid,
      type: this.kind,
      name: this.name.slice(0, 128),
      muted: this.muted,
      source: this.source,
      width: Math.round(this.width),
      height: Math.round(this.height),
      mid,
    };
  }
}

/** A track another participant publishes; `track` holds its media while subscribed. */
export class RemoteTrack extends Track {}

function remoteTrackFrom(entry) {
  return new RemoteTrack({
    tid: entry.tid,
    kind: entry.type === TrackKind.Audio ? TrackKind.Audio : TrackKind.Video,
    source: entry.source || TrackSource.Other,
    name: entry.name || "",
    muted: !!entry.muted,
    width: entry.width || 0,
    height: entry.height || 0,
  });
}

// --- participants ---------------------------------------------------------------------------

class Participant extends Emitter {
  constructor(id, connectionId, role, displayName) {
    super();
    this.id = id;
    this.connectionId = connectionId;
    this.role = role;
    this.displayName = displayName;
    this.audioTracks = new Map();
    this.videoTracks = new Map();
  }

  getAudioTracks() {
    return [...this.audioTracks.values()];
  }

  getVideoTracks() {
    return [...this.videoTracks.values()];
  }

  getTracks() {
    return [...this.audioTracks.values(), ...this.videoTracks.values()];
  }

  _tracks(kind) {
    return kind === TrackKind.Audio ? this.audioTracks : this.videoTracks;
  }

  _track(tid) {
    return this.audioTracks.get(tid) ?? this.videoTracks.get(tid);
  }
}

/** Another participant in the space. */
export class RemoteParticipant extends Participant {
  #space;

  constructor(space, entry) {
    const role =
      entry.role === ParticipantRole.Subscriber ? ParticipantRole.Subscriber : ParticipantRole.Publisher;
    super(entry.participant_id, entry.connection_id, role, entry.display_name || "");
    this.#space = space;
    this.status = ParticipantStatus.Connected;
  }

  isSubscribed() {
    return this.getTracks().some((t) => t.hasMedia());
  }

  /** Manual subscription mode: receive this participant's tracks, now and as they publish.
   * Resolves once the server agreed and every current track's media arrived. */
  subscribe() {
    return this.#space._subscribe(this, true);
  }

  unsubscribe() {
    return this.#space._subscribe(this, false);
  }
}

/** This page's participant, the result of {@link Space.join}. */
export class LocalParticipant extends Participant {
  #space;

  constructor(space, role) {
    super("", "", role, "");
    this.#space = space;
  }

  /** Publish tracks (again publishing those already published does nothing). Resolves once the
   * server accepted them; rejects with a PublishTrackError carrying the server's message. */
  publishTracks(tracks) {
    return this.#space._publish(tracks);
  }

  /** Replace the media of published tracks by source (camera by camera, ...) without
   * renegotiating; returns the published tracks that now carry the new media. */
  updateTracks(tracks) {
    return this.#space._update(tracks);
  }

  unpublishTracks(tracks, { stop = false } = {}) {
    return this.#space._unpublish(tracks, stop);
  }

  unpublishAllTracks({ stop = false } = {}) {
    return this.#space._unpublish(this.getTracks(), stop);
  }

  /** Send `payload` (a string of at most 4 KB) to everyone in the space, this page included.
   * Resolves with the event as delivered (with its sequence number). */
  publishCustomEvent(payload) {
    return this.#space._customEvent(payload);
  }

  setDisplayName(displayName) {
    return this.#space._setDisplayName(displayName);
  }
}

// --- media ----------------------------------------------------------------------------------

function constraints(option, defaults) {
  if (!option) return false;
  if (option === true) return defaults;
  const { name: _name, constraints: extra, ...rest } = option;
  return { ...defaults, ...rest, ...(extra ?? {}) };
}

function optionName(option) {
  return option && option !== true ? option.name : undefined;
}

/** Camera and microphone as LocalTracks (both by default); video defaults to 1280x720. */
export async function getUserMedia(options = { audio: true, video: true }) {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: constraints(options.audio, {}),
    video: constraints(options.video, {
      width: { ideal: 1280, max: 1280 },
      height: { ideal: 720, max: 720 },
    }),
  });
  return [
    ...stream
      .getAudioTracks()
      .map((t) => new LocalTrack(t, { source: TrackSource.Microphone, name: optionName(options.audio) })),
    ...stream
      .getVideoTracks()
      .map((t) => new LocalTrack(t, { source: TrackSource.Camera, name: optionName(options.video) })),
  ];
}

/** A screen share as LocalTracks with the sources screenshare (and screenshareaudio); at most
 * 2560x1440 at 15 fps by default. */
export async function getDisplayMedia(options = { video: true }) {
  const stream = await navigator.mediaDevices.getDisplayMedia({
    audio: constraints(options.audio, {}),
    video: constraints(options.video ?? true, {
      width: { max: 2560 },
      height: { max: 1440 },
      frameRate: { max: 15 },
    }),
  });
  return [
    ...stream
      .getAudioTracks()
      .map(
        (t) => new LocalTrack(t, { source: TrackSource.ScreenshareAudio, name: optionName(options.audio) }),
      ),
    ...stream
      .getVideoTracks()
      .map((t) => new LocalTrack(t, { source: TrackSource.Screenshare, name: optionName(options.video) })),
  ];
}

/** LocalTracks of any MediaStream (a canvas, a video element): camera for video, microphone
 * for audio (use `new LocalTrack(track, {source})` for another source). */
export async function getLocalTracksFromMediaStream(streamName, stream) {
  return stream.getTracks().map((t) => new LocalTrack(t, { name: streamName }));
}

// --- one WebSocket and its peer connections -------------------------------------------------

/** Everything that lives as long as one WebSocket: a reconnect starts a new Connection. */
class Connection {
  constructor(url) {
    this.ws = new WebSocket(url);
    this.joined = false;
    this.closed = false;
    /** After an error with fatal && !retry the server ends the session: do not come back. */
    this.final = false;
    this.inbox = Promise.resolve();
    this.pub = null;
    this.sub = null;
    this.sfuId = "";
    /** @type {Map<LocalTrack, RTCRtpTransceiver>} */
    this.sending = new Map();
    this.requests = new Map();
    this.nextRequest = 0;
    /** The one outstanding publisher offer: {id, resolve, reject}. */
    this.offer = null;
    /** Media that arrived before its track was announced: tid -> {track, stream}. */
    this.early = new Map();
  }

  send(message) {
    if (this.closed || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  /** Send a message with a request_id; resolves with the reply the caller matches, rejects
   * with `Kind` on the server's error for it, on a timeout, or when the connection ends. */
  request(message, Kind, timeoutMs = REQUEST_TIMEOUT_MS) {
    const id = `r${++this.nextRequest}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.requests.delete(id);
        reject(new RequestTimeoutError(`no reply from the server within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      const done = (fn) => (value) => {
        clearTimeout(timer);
        this.requests.delete(id);
        fn(value);
      };
      this.requests.set(id, { resolve: done(resolve), reject: done(reject), Kind });
      if (!this.send({ ...message, request_id: id })) {
        this.requests.get(id).reject(new Kind("not connected to the space"));
      }
    });
  }

  /** The server's error for one of our requests (its correlator names the request_id). */
  failRequest(error) {
    const ids = String(error.request_error?.correlator ?? "").split(",");
    for (const id of ids) {
      if (this.offer && this.offer.id === id) {
        this.offer.reject(new PublishTrackError(error.message, flags(error)));
        return true;
      }
      const request = this.requests.get(id);
      if (request) {
        request.reject(new request.Kind(error.message, flags(error)));
        return true;
      }
    }
    return false;
  }

  peerConnection(type, iceServers, onFailed) {
    // The server's first subscriber offer may have no m-lines and so no BUNDLE group, which
    // max-bundle refuses; the answerer follows the offer's bundling anyway.
    const pc = new RTCPeerConnection({ iceServers, bundlePolicy: type === 2 ? "max-bundle" : "balanced" });
    pc.onicecandidate = ({ candidate }) => {
      // TCP candidates are useless to the media node; an empty one ends gathering.
      if (!candidate?.candidate || / tcp /i.test(candidate.candidate)) return;
      this.send({
        candidate: {
          candidate: {
            candidate: candidate.candidate,
            sdp_mid: candidate.sdpMid,
            sdp_mline_index: candidate.sdpMLineIndex,
            username_fragment: candidate.usernameFragment,
          },
          type,
          sfu_id: this.sfuId,
        },
      });
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed" && !this.closed) onFailed();
    };
    return pc;
  }

  close(code, reason) {
    if (this.closed) return;
    this.closed = true;
    const ended = new DisconnectedError("the connection to the space ended", { code });
    this.offer?.reject(ended);
    for (const request of [...this.requests.values()]) request.reject(ended);
    this.pub?.close();
    this.sub?.close();
    // A browser may only send 1000 or 3000-4999 (a received 1006 is not ours to send).
    const sendable = code === 1000 || (code >= 3000 && code <= 4999);
    if (this.ws.readyState <= WebSocket.OPEN) this.ws.close(sendable ? code : 1000, reason);
  }
}

function decodeRole(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, "=")));
    return claims.role === "subscriber" ? ParticipantRole.Subscriber : ParticipantRole.Publisher;
  } catch {
    return ParticipantRole.Publisher;
  }
}

/** The backend this module was served by: <origin>/sdk/spaces.js -> ws(s)://<origin>. */
function defaultBackend() {
  const base = new URL("..", import.meta.url);
  return backendFrom(base.href);
}

function backendFrom(url) {
  const parsed = new URL(url, globalThis.location?.href);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new SpaceOptionsError(`backendUrl must be a ws, wss, http or https URL, not ${url}`);
  }
  parsed.search = "";
  parsed.hash = "";
  return parsed.href.replace(/\/+$/, "");
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// --- the space ------------------------------------------------------------------------------

/**
 * Where participants meet. `new Space(token, options)`, then `join()`.
 * Options: displayName, subscriptionMode (AUTOMATIC or MANUAL), automaticParticipantLimit
 * (1..20, default 16), backendUrl (default: the server this module was loaded from).
 */
export class Space extends Emitter {
  #token;
  #backend;
  #manual;
  #limit;
  #conn = null;
  #state = "new";
  #participants = new Map();
  #limits = { custom_events_per_second: 0, default_track_limit: 1, seconds_per_set_display_name: 0 };
  #iceServers = [];
  #publishing = Promise.resolve();
  #subscribed = new Set();
  #speaking = new Set();
  #simulcast = { camera_encodings: [], screenshare_encodings: [] };
  #qualities = new Map();

  constructor(token, options = {}) {
    super();
    if (typeof token !== "string" || !token) throw new SpaceOptionsError("a token is required");
    const mode = options.subscriptionMode ?? SubscriptionMode.Automatic;
    if (mode !== SubscriptionMode.Automatic && mode !== SubscriptionMode.Manual) {
      throw new SpaceOptionsError("subscriptionMode must be AUTOMATIC or MANUAL");
    }
    const limit = options.automaticParticipantLimit ?? 16;
    if (!Number.isInteger(limit) || limit < 1 || limit > 20) {
      throw new SpaceOptionsError("automaticParticipantLimit must be an integer from 1 to 20");
    }
    const name = options.displayName ?? "";
    if (typeof name !== "string" || name.length > 64) {
      throw new SpaceOptionsError("displayName must be a string of at most 64 characters");
    }
    this.#token = token;
    this.#backend = options.backendUrl ? backendFrom(options.backendUrl) : defaultBackend();
    this.#manual = mode === SubscriptionMode.Manual;
    this.#limit = limit;
    /** @type {LocalParticipant | undefined} set by join() */
    this.localParticipant = undefined;
    this._local = new LocalParticipant(this, decodeRole(token));
    this._local.displayName = name;
    this.broadcasting = false;
    /** Spaces only: whether this page receives audio only (its link cannot carry video). */
    this.audioOnly = false;
    this.sessionId = undefined;
    /** @type {{participant: RemoteParticipant | LocalParticipant, track: Track}[]} */
    this.activeSpeakers = [];
  }

  /** "new", "joining", "joined", "reconnecting", "closed" (ended by the server or after
   * failed reconnects) or "left". */
  get state() {
    return this.#state;
  }

  /** Everyone else in the space, by connection id. */
  get remoteParticipants() {
    return new Map(this.#participants);
  }

  /** Join the space. Rejects with JWTError (a refused token, a duplicate participant id) or
   * ConnectionError (a full space, an unreachable server), carrying the server's message. */
  async join() {
    if (this.#state !== "new") throw new ConnectionError(`join() cannot be called when ${this.#state}`);
    this.#state = "joining";
    try {
      await this.#connect(0);
    } catch (error) {
      if (this.#state === "joining") this.#state = "closed";
      throw error;
    }
    this.#state = "joined";
    return this.localParticipant;
  }

  /** Leave: close the peer connections and the socket. The participant id is free at once. */
  leave() {
    if (this.#state === "left") return;
    this.#state = "left";
    this.#conn?.close(1000, "left");
    this.#conn = null;
  }

  // --- connecting ---------------------------------------------------------------------------

  #url(attempt) {
    const local = this._local;
    const query = new URLSearchParams({
      token: this.#token,
      sdk_version: SDK_VERSION,
      managed_subscriptions: String(this.#manual ? 0 : this.#limit),
    });
    if (local.displayName) query.set("display_name", local.displayName);
    if (attempt > 0) {
      query.set("reconnect_id", local.id);
      query.set("reconnect_attempt", String(attempt));
    }
    return `${this.#backend}/v1?${query}`;
  }

  /** Open a socket and resolve once `joined` is applied; reject on an error, a close or a
   * timeout before it (never hang). */
  #connect(attempt) {
    const conn = new Connection(this.#url(attempt));
    this.#conn = conn;
    return new Promise((resolve, reject) => {
      let settled = false;
      const settle = (fn, value) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        fn(value);
      };
      const timer = setTimeout(() => {
        settle(
          reject,
          new ConnectionError(`no answer from ${this.#backend} within ${CONNECT_TIMEOUT_MS / 1000} s`, {
            retry: true,
          }),
        );
        conn.close(1000, "timeout");
      }, CONNECT_TIMEOUT_MS);
      conn.ws.onmessage = (event) => {
        let message;
        try {
          message = JSON.parse(event.data);
        } catch {
          return;
        }
        if (!conn.joined && message.error) {
          settle(reject, joinError(message.error));
          return;
        }
        conn.inbox = conn.inbox
          .then(async () => {
            if (conn.closed) return;
            if (message.joined && !conn.joined) {
              try {
                await this.#onJoined(conn, message.joined);
              } catch (error) {
                settle(reject, new ConnectionError(`joining failed: ${error.message}`, { retry: true }));
                conn.close(1000, "join failed");
                return;
              }
              // Joined only now: a close while `joined` was being applied failed the join.
              conn.joined = true;
              settle(resolve);
            } else if (conn.joined) {
              await this.#dispatch(conn, message);
            }
          })
          .catch((error) => console.warn("spaces: handling a message failed", error));
      };
      conn.ws.onclose = (event) => {
        if (!conn.joined) {
          conn.close(event.code);
          settle(
            reject,
            new ConnectionError(`the connection closed (${event.code}) before joining`, {
              code: event.code,
              retry: event.code !== CLOSE_NO_RECONNECT,
            }),
          );
          return;
        }
        this.#onClose(conn, event);
      };
    });
  }

  async #onJoined(conn, joined) {
    const local = this._local;
    local.id = joined.participant_id;
    local.connectionId = joined.connection_id;
    if (joined.display_name) local.displayName = joined.display_name;
    this.localParticipant = local;
    this.sessionId = joined.session_id;
    this.#limits = joined.limits ?? this.#limits;
    this.#simulcast = joined.simulcast ?? this.#simulcast;
    this.#iceServers = (joined.ice_servers ?? []).map((s) => ({
      urls: s.urls,
      username: s.username || undefined,
      credential: s.credential || undefined,
    }));
    if (!!joined.broadcasting !== this.broadcasting) {
      this.broadcasting = !!joined.broadcasting;
      this.emit(SpaceEvent.BroadcastStateChanged, this.broadcasting);
    }
    // A reconnect: who left meanwhile is reported gone, who came is new (Mux's SDK does this).
    const present = new Map((joined.participants ?? []).map((entry) => [entry.connection_id, entry]));
    for (const connectionId of [...this.#participants.keys()]) {
      if (!present.has(connectionId)) this.#participantLeft(connectionId);
    }
    for (const entry of present.values()) {
      const existing = this.#participants.get(entry.connection_id);
      if (existing) this.#syncTracks(existing, entry);
      else this.#participantJoined(entry);
    }
    for (const sfu of joined.sub_sfus ?? []) await this.#onSubscriberOffer(conn, sfu);
  }

  #onClose(conn, event) {
    conn.close(event.code);
    if (conn !== this.#conn || this.#state === "left") return;
    const reason = event.reason || "the connection to the space closed";
    if (event.code === CLOSE_NO_RECONNECT || conn.final) {
      this.#end(
        SpaceEvent.LocalParticipantDisconnected,
        new DisconnectedError(reason, { code: event.code, fatal: true }),
      );
      return;
    }
    this.#reconnect(reason);
  }

  #end(event, error) {
    this.#state = "closed";
    this.#conn = null;
    this.#dropMedia();
    this.emit(event, error);
  }

  async #reconnect(reason) {
    this.#state = "reconnecting";
    this.#dropMedia();
    this.emit(SpaceEvent.LocalParticipantReconnecting);
    let failure = new DisconnectedError(reason, { retry: true });
    for (let attempt = 1; attempt <= RECONNECT_ATTEMPTS; attempt++) {
      if (attempt > 1) await sleep(RECONNECT_DELAY_MS);
      if (this.#state !== "reconnecting") return;
      try {
        await this.#connect(attempt);
      } catch (error) {
        if (this.#state !== "reconnecting") return;
        failure = error;
        if (error.fatal && !error.retry) break;
        continue;
      }
      if (this.#state !== "reconnecting") return;
      this.#state = "joined";
      await this.#restore().catch((error) =>
        console.warn("spaces: republishing after a reconnect failed", error),
      );
      if (this.#state === "joined") this.emit(SpaceEvent.LocalParticipantReconnected, this._local);
      return;
    }
    this.#end(
      SpaceEvent.LocalParticipantReconnectFailed,
      new DisconnectedError(failure.message, { code: failure.code, fatal: true }),
    );
  }

  /** After a reconnect: the same tracks (same tids) on a new peer connection, and the manual
   * subscriptions again. */
  async #restore() {
    if (this._local.getTracks().length) await this.#negotiate();
    for (const [tid, request] of this.#qualities) this.#conn?.send({ set_video_quality: { tid, ...request } });
    const wanted = [...this.#participants.values()].filter((p) => this.#subscribed.has(p.id));
    if (wanted.length) await this.#sendSubscription(wanted, true);
  }

  /** The peer connections are gone: remote media stops until the next subscriber offer. */
  #dropMedia() {
    for (const participant of this.#participants.values()) {
      for (const track of participant.getTracks()) this.#unsubscribed(participant, track);
    }
  }

  // --- messages from the server -------------------------------------------------------------

  async #dispatch(conn, message) {
    const key = Object.keys(message).find(
      (k) => k !== "request_id" && message[k] !== undefined && message[k] !== null,
    );
    const body = message[key];
    switch (key) {
      case "answer":
        conn.offer?.resolve(body);
        break;
      case "sub_offer":
        await this.#onSubscriberOffer(conn, body);
        break;
      case "candidate":
        await this.#onCandidate(conn, body);
        break;
      case "participant_connected":
        if (!this.#participants.has(body.connection_id)) this.#participantJoined(body);
        break;
      case "participant_disconnected":
        this.#participantLeft(body.connection_id);
        break;
      case "add_track":
        this.#trackPublished(conn, body.connection_id, body.track);
        break;
      case "remove_track":
        this.#trackUnpublished(body.connection_id, body.track?.tid);
        break;
      case "track_muted":
      case "track_unmuted":
        this.#trackMuted(body.connection_id, body.track?.tid, key === "track_muted");
        break;
      case "active_speakers":
        this.#activeSpeakers(body.tracks ?? []);
        break;
      case "custom_event":
        this.#customEvent(conn, body, message.request_id);
        break;
      case "participant_update":
        this.#participantUpdate(conn, body, message.request_id);
        break;
      case "subscribe_tracks":
      case "unsubscribe_tracks":
        conn.requests.get(message.request_id)?.resolve(body);
        break;
      case "audio_only":
        this.audioOnly = !!body.active;
        this.emit(SpaceEvent.AudioOnlyChanged, this.audioOnly, body.estimated_bitrate ?? 0);
        break;
      case "layers_wanted":
        await this.#layersWanted(conn, body.tid, body.rids ?? []);
        break;
      case "broadcast_state_update": {
        const broadcasting = body === 1;
        if (broadcasting !== this.broadcasting) {
          this.broadcasting = broadcasting;
          this.emit(SpaceEvent.BroadcastStateChanged, broadcasting);
        }
        break;
      }
      case "error":
        this.#onError(conn, body);
        break;
      default:
        break; // a newer server's message: ignore it
    }
  }

  #onError(conn, error) {
    if (conn.failRequest(error)) return;
    if (!error.fatal) {
      console.warn(`spaces: ${error.message} (error ${error.type})`);
      return;
    }
    // fatal && retry: reconnect now; fatal && !retry: the session is over.
    conn.final = !error.retry;
    conn.ws.close(error.retry ? CLOSE_RECONNECT : 1000, String(error.message ?? "").slice(0, 120));
  }

  #participant(connectionId) {
    if (connectionId === this._local.connectionId) return this._local;
    return this.#participants.get(connectionId);
  }

  #participantJoined(entry) {
    const participant = new RemoteParticipant(this, entry);
    this.#participants.set(participant.connectionId, participant);
    this.emit(SpaceEvent.ParticipantJoined, participant);
    for (const track of entry.tracks ?? []) this.#trackPublished(this.#conn, participant.connectionId, track);
  }

  #participantLeft(connectionId) {
    const participant = this.#participants.get(connectionId);
    if (!participant) return;
    for (const track of participant.getTracks()) this.#trackUnpublished(connectionId, track.tid);
    this.#participants.delete(connectionId);
    participant.status = ParticipantStatus.Disconnected;
    if (this.#speaking.delete(participant)) participant.emit(ParticipantEvent.StoppedSpeaking);
    this.emit(SpaceEvent.ParticipantLeft, participant);
  }

  #syncTracks(participant, entry) {
    if (entry.display_name !== undefined && entry.display_name !== participant.displayName) {
      participant.displayName = entry.display_name;
      this.#displayNameChanged(participant);
    }
    const announced = new Map((entry.tracks ?? []).map((t) => [t.tid, t]));
    for (const track of participant.getTracks()) {
      if (!announced.has(track.tid)) this.#trackUnpublished(participant.connectionId, track.tid);
    }
    for (const t of announced.values()) {
      const track = participant._track(t.tid);
      if (!track) this.#trackPublished(this.#conn, participant.connectionId, t);
      else this.#trackMuted(participant.connectionId, t.tid, !!t.muted);
    }
  }

  #trackPublished(conn, connectionId, entry) {
    const participant = this.#participants.get(connectionId);
    if (!participant || !entry?.tid || participant._track(entry.tid)) return;
    const track = remoteTrackFrom(entry);
    participant._tracks(track.kind).set(track.tid, track);
    participant.emit(ParticipantEvent.TrackPublished, track);
    this.emit(SpaceEvent.ParticipantTrackPublished, participant, track);
    const early = conn?.early.get(track.tid);
    if (early) {
      conn.early.delete(track.tid);
      this.#subscribedTo(participant, track, early.track, early.stream);
    }
  }

  #trackUnpublished(connectionId, tid) {
    const participant = this.#participants.get(connectionId);
    const track = participant?._track(tid);
    if (!track) return;
    this.#unsubscribed(participant, track);
    participant._tracks(track.kind).delete(tid);
    participant.emit(ParticipantEvent.TrackUnpublished, track);
    this.emit(SpaceEvent.ParticipantTrackUnpublished, participant, track);
  }

  #trackMuted(connectionId, tid, muted) {
    const participant = this.#participants.get(connectionId);
    const track = participant?._track(tid);
    if (!track || !track._setMuted(muted)) return;
    participant.emit(muted ? ParticipantEvent.TrackMuted : ParticipantEvent.TrackUnmuted, track);
    this.emit(
      muted ? SpaceEvent.ParticipantTrackMuted : SpaceEvent.ParticipantTrackUnmuted,
      participant,
      track,
    );
  }

  #activeSpeakers(entries) {
    const speakers = [];
    for (const { connection_id: connectionId, track_id: tid } of entries) {
      const participant = this.#participant(connectionId);
      const track = participant?._track(tid);
      if (participant && track) speakers.push({ participant, track });
    }
    const now = new Set(speakers.map((s) => s.participant));
    for (const participant of this.#speaking) {
      if (!now.has(participant)) participant.emit(ParticipantEvent.StoppedSpeaking);
    }
    for (const participant of now) {
      if (!this.#speaking.has(participant)) participant.emit(ParticipantEvent.StartedSpeaking);
    }
    this.#speaking = now;
    this.activeSpeakers = speakers;
    this.emit(SpaceEvent.ActiveSpeakersChanged, speakers);
  }

  #customEvent(conn, body, requestId) {
    const event = {
      payload: body.payload,
      sequenceNumber: body.sequence_num,
      scope: body.scope ?? CustomEventScope.SESSION,
    };
    const participant = this.#participant(body.connection_id);
    if (participant) {
      participant.emit(ParticipantEvent.CustomEventPublished, event);
      this.emit(SpaceEvent.ParticipantCustomEventPublished, participant, event);
    }
    if (requestId !== undefined) conn.requests.get(requestId)?.resolve(event);
  }

  #participantUpdate(conn, body, requestId) {
    const participant = this.#participant(body.connection_id);
    if (participant && body.display_name !== undefined && body.display_name !== participant.displayName) {
      participant.displayName = body.display_name;
      this.#displayNameChanged(participant);
    }
    if (requestId !== undefined) conn.requests.get(requestId)?.resolve(this._local);
  }

  #displayNameChanged(participant) {
    participant.emit(ParticipantEvent.DisplayNameChanged, participant.displayName);
    this.emit(SpaceEvent.ParticipantDisplayNameChanged, participant);
  }

  // --- receiving ----------------------------------------------------------------------------

  #newPeerConnection(conn, type) {
    return conn.peerConnection(type, this.#iceServers, () => {
      if (conn === this.#conn) conn.ws.close(CLOSE_RECONNECT, "media connection failed");
    });
  }

  async #onSubscriberOffer(conn, { sfu_id: sfuId, sdp }) {
    conn.sfuId = sfuId;
    if (!conn.sub) {
      conn.sub = this.#newPeerConnection(conn, 1);
      conn.sub.ontrack = (event) => this.#onTrack(conn, event);
    }
    const pc = conn.sub;
    await pc.setRemoteDescription({ type: "offer", sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    conn.send({ sub_answer: { sfu_id: sfuId, sdp: pc.localDescription.sdp } });
  }

  async #onCandidate(conn, body) {
    const pc = body.type === 1 ? conn.sub : conn.pub;
    const c = body.candidate;
    if (!pc || !c?.candidate) return;
    await pc
      .addIceCandidate({ candidate: c.candidate, sdpMid: c.sdp_mid, sdpMLineIndex: c.sdp_mline_index })
      .catch(() => {});
  }

  /** Each m-section of the subscribing connection carries one track; its stream id is the
   * track's tid. */
  #onTrack(conn, event) {
    const stream = event.streams[0];
    if (!stream || conn !== this.#conn) return;
    for (const participant of this.#participants.values()) {
      const track = participant._track(stream.id);
      if (track) {
        this.#subscribedTo(participant, track, event.track, stream);
        return;
      }
    }
    conn.early.set(stream.id, { track: event.track, stream });
  }

  #subscribedTo(participant, track, mediaStreamTrack, stream) {
    stream.addEventListener("removetrack", () => {
      if (track._stream === stream) this.#unsubscribed(participant, track);
    });
    track._stream = stream;
    track._setMedia(mediaStreamTrack);
    participant.emit(ParticipantEvent.TrackSubscribed, track);
    this.emit(SpaceEvent.ParticipantTrackSubscribed, participant, track);
  }

  #unsubscribed(participant, track) {
    if (!track._stream) return;
    track._stream = undefined;
    track._setMedia(undefined);
    participant.emit(ParticipantEvent.TrackUnsubscribed, track);
    this.emit(SpaceEvent.ParticipantTrackUnsubscribed, participant, track);
  }

  async _subscribe(participant, subscribe) {
    if (!this.#manual)
      throw new SubscriptionError("subscribe() and unsubscribe() need SubscriptionMode.Manual");
    if (subscribe) this.#subscribed.add(participant.id);
    else this.#subscribed.delete(participant.id);
    await this.#sendSubscription([participant], subscribe);
    if (!subscribe) return;
    const deadline = Date.now() + NEGOTIATION_TIMEOUT_MS;
    while (participant.getTracks().some((t) => !t.hasMedia())) {
      if (Date.now() > deadline) throw new RequestTimeoutError("subscribed, but the media did not arrive");
      if (this.#state !== "joined") throw new SubscriptionError("the connection to the space ended");
      await sleep(50);
    }
  }

  async #sendSubscription(participants, subscribe) {
    const conn = this.#conn;
    if (!conn?.joined) throw new SubscriptionError("not connected to the space");
    const key = subscribe ? "subscribe_tracks" : "unsubscribe_tracks";
    const reply = await conn.request(
      { [key]: { connections: participants.map((p) => ({ connection_id: p.connectionId, track_ids: [] })) } },
      SubscriptionError,
    );
    if (reply?.failures?.length) {
      throw new SubscriptionError(
        `cannot ${subscribe ? "subscribe to" : "unsubscribe from"} ${reply.failures.map((f) => f.connection_id).join(", ")}`,
      );
    }
  }

  // --- publishing ---------------------------------------------------------------------------

  async _publish(tracks) {
    const local = this._local;
    if (this.#state !== "joined" && this.#state !== "reconnecting")
      throw new PublishTrackError("join the space before publishing");
    const fresh = tracks.filter((t) => !local._track(t.tid));
    const limit = this.#limits.default_track_limit;
    for (const source of new Set(fresh.map((t) => t.source))) {
      const count =
        local.getTracks().filter((t) => t.source === source).length +
        fresh.filter((t) => t.source === source).length;
      if (count > limit) throw new PublishTrackError(`at most ${limit} ${source} track(s) may be published`);
    }
    for (const track of fresh) {
      local._tracks(track.kind).set(track.tid, track);
      track._onMuteChange = (t, muted) => this.#sendMute(t, muted);
    }
    if (this.#state === "reconnecting") return tracks; // published with the others once back
    try {
      await this.#negotiate();
    } catch (error) {
      for (const track of fresh) this.#forget(track);
      throw error instanceof PublishTrackError ? error : new PublishTrackError(error.message);
    }
    for (const track of fresh) local.emit(ParticipantEvent.TrackPublished, track);
    return tracks;
  }

  _update(tracks) {
    const updated = [];
    for (const replacement of tracks) {
      const published = this._local
        .getTracks()
        .find((t) => t.source === replacement.source && t.kind === replacement.kind);
      if (!published) continue;
      this.#conn?.sending.get(published)?.sender.replaceTrack(replacement.track);
      published._setMedia(replacement.track);
      replacement.track.enabled = !published.muted;
      updated.push(published);
    }
    return updated;
  }

  async _unpublish(tracks, stop) {
    const gone = tracks.filter((t) => this._local._track(t.tid));
    for (const track of gone) {
      this.#forget(track);
      if (stop) track.stop();
      this._local.emit(ParticipantEvent.TrackUnpublished, track);
    }
    if (gone.length && this.#state === "joined") {
      await this.#negotiate().catch((error) => {
        throw new UnpublishTrackError(error.message);
      });
    }
  }

  #forget(track) {
    this._local._tracks(track.kind).delete(track.tid);
    track._onMuteChange = null;
  }

  #sendMute(track, muted) {
    this.#conn?.send({ [muted ? "mute_track" : "unmute_track"]: track.tid });
    this._local.emit(muted ? ParticipantEvent.TrackMuted : ParticipantEvent.TrackUnmuted, track);
  }

  /** Bring the publishing connection in line with the published tracks: one negotiation at a
   * time (the server answers offers in order). */
  #negotiate() {
    const run = this.#publishing.then(() => this.#negotiateOnce());
    this.#publishing = run.catch(() => {});
    return run;
  }

  async #negotiateOnce() {
    const conn = this.#conn;
    if (!conn?.joined || conn.closed) return; // a reconnect publishes everything again
    const tracks = this._local.getTracks();
    const fresh = tracks.filter((t) => !conn.sending.has(t));
    const gone = [...conn.sending.keys()].filter((t) => !tracks.includes(t));
    if (!fresh.length && !gone.length) return;
    const created = !conn.pub;
    if (created) conn.pub = this.#newPeerConnection(conn, 2);
    const pc = conn.pub;
    for (const track of gone) {
      const transceiver = conn.sending.get(track);
      conn.sending.delete(track);
      await transceiver.sender.replaceTrack(null);
      transceiver.direction = "inactive";
    }
    for (const track of fresh) {
      const init = { direction: "sendonly" };
      const encodings = this.#encodings(track);
      if (encodings.length) init.sendEncodings = encodings;
      conn.sending.set(track, pc.addTransceiver(track.track, init));
    }
    await pc.setLocalDescription(await pc.createOffer());
    for (const track of fresh) conn.send({ pending_track: track._declaration(conn.sending.get(track).mid) });
    const id = `r${++conn.nextRequest}`;
    const answered = new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new PublishTrackError("the server did not answer the offer")),
        NEGOTIATION_TIMEOUT_MS,
      );
      const done = (fn) => (value) => {
        clearTimeout(timer);
        if (conn.offer?.id === id) conn.offer = null;
        fn(value);
      };
      conn.offer = { id, resolve: done(resolve), reject: done(reject) };
    });
    conn.send({ offer: pc.localDescription.sdp, request_id: id });
    try {
      await pc.setRemoteDescription({ type: "answer", sdp: await answered });
    } catch (error) {
      // The connection ended meanwhile: the reconnect publishes every track again.
      if (conn.closed) return;
      // Refused (a subscriber's token, a limit): take the offer back so the connection can
      // negotiate again; a connection that never got an answer is simply dropped.
      for (const track of fresh) conn.sending.delete(track);
      if (created) {
        pc.close();
        conn.pub = null;
      } else if (pc.signalingState === "have-local-offer") {
        await pc.setLocalDescription({ type: "rollback" }).catch(() => {});
        for (const t of pc.getTransceivers()) {
          if (!t.currentDirection) t.direction = "inactive";
        }
      }
      throw error;
    }
  }

  /** The simulcast encodings the server handed out for this track's source (Mux's format). */
  #encodings(track) {
    if (track.kind !== TrackKind.Video) return [];
    const list =
      track.source === TrackSource.Screenshare
        ? this.#simulcast.screenshare_encodings
        : this.#simulcast.camera_encodings;
    return (list ?? []).map((e) => {
      const encoding = { rid: e.rid, active: true };
      if (e.max_bitrate > 0) encoding.maxBitrate = e.max_bitrate;
      if (e.scale_resolution_down_by > 0) encoding.scaleResolutionDownBy = e.scale_resolution_down_by;
      if (e.max_framerate > 0) encoding.maxFramerate = e.max_framerate;
      return encoding;
    });
  }

  /** Dynacast: send only the layers (rids) of a published track that some subscriber wants;
   * the node sends `layers_wanted` when that changes (pausing a layer a few seconds after it
   * went unused, resuming at once).
   * @param {Connection} conn
   * @param {string} tid the published track's id
   * @param {string[]} rids the encodings to keep active; every other one is paused */
  async #layersWanted(conn, tid, rids) {
    const track = [...conn.sending.keys()].find((t) => t.tid === tid);
    const sender = track && conn.sending.get(track)?.sender;
    if (!sender) return;
    const parameters = sender.getParameters();
    if (!parameters.encodings || parameters.encodings.length < 2) return;
    let changed = false;
    for (const encoding of parameters.encodings) {
      const active = rids.includes(encoding.rid);
      if (encoding.active !== active) {
        encoding.active = active;
        changed = true;
      }
    }
    if (changed) await sender.setParameters(parameters).catch((e) => console.warn("spaces: layers", e));
  }

  /** Spaces only: the most this page wants of a remote video track, a quality
   * ({@link VideoQuality}) and/or the size it renders the track at; the server sends the best
   * simulcast layer within it that the link carries. Kept across reconnects. */
  setVideoQuality(track, { quality = "", width = 0, height = 0 } = {}) {
    if (!(track instanceof RemoteTrack) || track.kind !== TrackKind.Video) {
      throw new TypeError("setVideoQuality needs a remote video track");
    }
    if (!Object.values(VideoQuality).includes(quality)) throw new TypeError(`unknown quality ${quality}`);
    const request = { quality, width: Math.round(width), height: Math.round(height) };
    this.#qualities.set(track.tid, request);
    this.#conn?.send({ set_video_quality: { tid: track.tid, ...request } });
  }

  // --- requests -----------------------------------------------------------------------------

  async _customEvent(payload) {
    if (typeof payload !== "string") throw new PublishCustomEventError("the payload must be a string");
    const conn = this.#conn;
    if (!conn?.joined) throw new PublishCustomEventError("not connected to the space");
    return conn.request(
      { custom_event: { id: newTrackId(), payload, scope: CustomEventScope.SESSION } },
      PublishCustomEventError,
    );
  }

  async _setDisplayName(displayName) {
    if (typeof displayName !== "string") throw new SetDisplayNameError("the display name must be a string");
    const conn = this.#conn;
    if (!conn?.joined) throw new SetDisplayNameError("not connected to the space");
    await conn.request({ set_display_name: displayName }, SetDisplayNameError);
    return this._local;
  }
}
