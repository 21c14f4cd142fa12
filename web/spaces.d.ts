// Types of the Spaces browser client (spaces.js, served at /sdk/spaces.js). The names follow
// @mux/spaces-web 1.2.0, so an app moving from Mux changes its import and keeps its code.
//
//   import { Space, SpaceEvent, getUserMedia } from "https://spaces.example.com/sdk/spaces.js";

/** Node-style event methods, as Mux's classes have them. */
declare class Emitter {
  on(event: string, listener: (...args: any[]) => void): this;
  addListener(event: string, listener: (...args: any[]) => void): this;
  once(event: string, listener: (...args: any[]) => void): this;
  off(event: string, listener: (...args: any[]) => void): this;
  removeListener(event: string, listener: (...args: any[]) => void): this;
  removeAllListeners(event?: string): this;
  listenerCount(event: string): number;
  emit(event: string, ...args: any[]): boolean;
}

// --- enums ---------------------------------------------------------------------------------

export declare const SpaceEvent: {
  /** args: (LocalParticipant) */
  readonly LocalParticipantReconnected: "LocalParticipantReconnected";
  /** args: () */
  readonly LocalParticipantReconnecting: "LocalParticipantReconnecting";
  /** args: (DisconnectedError) — every reconnect attempt failed. */
  readonly LocalParticipantReconnectFailed: "LocalParticipantReconnectFailed";
  /** Spaces only (Mux's SDK says nothing then). The server ended the session for good, with
   * close code 4000: removed by an admin, the space deleted, or the participant's connection
   * taken over. args: (DisconnectedError) with `code` 4000 and the server's reason. */
  readonly LocalParticipantDisconnected: "LocalParticipantDisconnected";
  /** args: (RemoteParticipant) */
  readonly ParticipantJoined: "ParticipantJoined";
  /** args: (RemoteParticipant) */
  readonly ParticipantLeft: "ParticipantLeft";
  /** args: (RemoteParticipant, RemoteTrack) */
  readonly ParticipantTrackPublished: "ParticipantTrackPublished";
  /** args: (RemoteParticipant, RemoteTrack) */
  readonly ParticipantTrackUnpublished: "ParticipantTrackUnpublished";
  /** The track's media arrived (`track.track` is set). args: (RemoteParticipant, RemoteTrack) */
  readonly ParticipantTrackSubscribed: "ParticipantTrackSubscribed";
  /** args: (RemoteParticipant, RemoteTrack) */
  readonly ParticipantTrackUnsubscribed: "ParticipantTrackUnsubscribed";
  /** args: (RemoteParticipant, RemoteTrack) */
  readonly ParticipantTrackMuted: "ParticipantTrackMuted";
  /** args: (RemoteParticipant, RemoteTrack) */
  readonly ParticipantTrackUnmuted: "ParticipantTrackUnmuted";
  /** args: (ActiveSpeaker[]) — loudest first; may include the local participant. */
  readonly ActiveSpeakersChanged: "ActiveSpeakersChanged";
  /** args: (boolean) */
  readonly BroadcastStateChanged: "BroadcastStateChanged";
  /** args: (RemoteParticipant | LocalParticipant, CustomEvent) */
  readonly ParticipantCustomEventPublished: "ParticipantCustomEventPublished";
  /** args: (RemoteParticipant | LocalParticipant) */
  readonly ParticipantDisplayNameChanged: "ParticipantDisplayNameChanged";
  /** Spaces only: this page receives audio only (its link cannot carry even the lowest video
   * layers), or video resumed. args: (active: boolean, estimatedBitrate: number) */
  readonly AudioOnlyChanged: "AudioOnlyChanged";
};
export type SpaceEvent = (typeof SpaceEvent)[keyof typeof SpaceEvent];

export declare const ParticipantEvent: {
  readonly TrackMuted: "TrackMuted";
  readonly TrackUnmuted: "TrackUnmuted";
  readonly TrackPublished: "TrackPublished";
  readonly TrackUnpublished: "TrackUnpublished";
  /** Not emitted by LocalParticipant. */
  readonly TrackSubscribed: "TrackSubscribed";
  /** Not emitted by LocalParticipant. */
  readonly TrackUnsubscribed: "TrackUnsubscribed";
  readonly StartedSpeaking: "StartedSpeaking";
  readonly StoppedSpeaking: "StoppedSpeaking";
  /** args: (CustomEvent) */
  readonly CustomEventPublished: "CustomEventPublished";
  /** args: (displayName: string) */
  readonly DisplayNameChanged: "DisplayNameChanged";
};
export type ParticipantEvent = (typeof ParticipantEvent)[keyof typeof ParticipantEvent];

export declare const TrackEvent: { readonly Muted: "Muted"; readonly Unmuted: "Unmuted" };
export type TrackEvent = (typeof TrackEvent)[keyof typeof TrackEvent];

export declare const TrackKind: { readonly Audio: 1; readonly Video: 2 };
export type TrackKind = (typeof TrackKind)[keyof typeof TrackKind];

export declare const TrackSource: {
  readonly Camera: "camera";
  readonly Microphone: "microphone";
  readonly Screenshare: "screenshare";
  readonly ScreenshareAudio: "screenshareaudio";
  readonly Other: "other";
};
export type TrackSource = (typeof TrackSource)[keyof typeof TrackSource];

export declare const SubscriptionMode: { readonly Automatic: "AUTOMATIC"; readonly Manual: "MANUAL" };
export type SubscriptionMode = (typeof SubscriptionMode)[keyof typeof SubscriptionMode];

export declare const ParticipantRole: { readonly Publisher: 1; readonly Subscriber: 2 };
export type ParticipantRole = (typeof ParticipantRole)[keyof typeof ParticipantRole];

export declare const ParticipantStatus: {
  readonly Connected: 1;
  readonly Disconnected: 2;
  readonly Reconnected: 3;
};
export type ParticipantStatus = (typeof ParticipantStatus)[keyof typeof ParticipantStatus];

export declare const CustomEventScope: { readonly UNKNOWN: 0; readonly SESSION: 1 };
export type CustomEventScope = (typeof CustomEventScope)[keyof typeof CustomEventScope];

/** `code` of an error refusing a join (or ending a session). */
export declare const JoinErrorType: {
  readonly Unknown: 0;
  readonly Disconnected: 1;
  readonly HitTimeLimit: 2;
  readonly DuplicateParticipantRejected: 3;
  readonly PeerConnectionClosed: 4;
  readonly InvalidPendingTrack: 5;
  readonly InvalidJWT: 6;
  readonly ParticipantLimitReached: 7;
};

/** `code` of an error refusing one request. */
export declare const RequestErrorType: {
  readonly Unknown: 0;
  readonly PendingTrackError: 1;
  readonly TrackMuteError: 2;
  readonly SubscribeTracksError: 3;
  readonly UnsubscribeTracksError: 4;
  readonly CustomEventError: 5;
  readonly CustomEventRateLimited: 6;
  readonly SetDisplayNameError: 7;
  readonly SetDisplayNameRateLimited: 8;
  readonly InvalidProtocolVersion: 9;
};

// --- errors --------------------------------------------------------------------------------

export interface ErrorFlags {
  code?: number;
  fatal?: boolean;
  retry?: boolean;
}

/** Every error of the client: `message` is the server's message, `code` its error type (a
 * close code for DisconnectedError), `fatal` and `retry` its flags. */
export declare class MuxError extends Error {
  constructor(message: string, flags?: ErrorFlags);
  code: number;
  fatal: boolean;
  retry: boolean;
}
export { MuxError as SpacesError };
/** The token was refused: error type 6 (bad or expired token, unknown space) or 3 (the
 * participant_id is already connected). */
export declare class JWTError extends MuxError {}
/** Joining failed otherwise: type 7 (the space is full), or no answer from the server. */
export declare class ConnectionError extends MuxError {}
export declare class DisconnectedError extends MuxError {}
export declare class InternalError extends MuxError {}
export declare class SpaceOptionsError extends MuxError {}
export declare class PublishTrackError extends MuxError {}
export declare class UnpublishTrackError extends MuxError {}
/** code 5 (refused) or 6 (rate limited). */
export declare class PublishCustomEventError extends MuxError {}
/** code 7 (refused) or 8 (rate limited). */
export declare class SetDisplayNameError extends MuxError {}
export declare class SubscriptionError extends MuxError {}
export declare class RequestTimeoutError extends MuxError {}

// --- tracks --------------------------------------------------------------------------------

export declare class Track extends Emitter {
  tid: string;
  /** The media: always set on a LocalTrack; on a RemoteTrack while subscribed. */
  track?: MediaStreamTrack;
  name: string;
  muted: boolean;
  source: TrackSource;
  width: number;
  height: number;
  kind: TrackKind;
  attachedElements: HTMLMediaElement[];
  isMuted(): boolean;
  getSource(): TrackSource;
  getKind(): TrackKind;
  hasMedia(): boolean;
  /** Show or play the track in `element`, or in a new <video>/<audio>; the element follows the
   * track's media (subscribed later, again after a reconnect). */
  attach(element?: HTMLMediaElement): HTMLMediaElement;
  detach(element?: HTMLMediaElement): HTMLMediaElement[];
}

export interface LocalTrackParams {
  /** Default: camera for video, microphone for audio. */
  source?: TrackSource;
  name?: string;
}

export declare class LocalTrack extends Track {
  constructor(mediaStreamTrack: MediaStreamTrack, params?: LocalTrackParams);
  track: MediaStreamTrack;
  deviceId?: string;
  /** Stop sending (the track stays published; the others see it muted). */
  mute(): void;
  unMute(): void;
  /** Stop capturing. */
  stop(): void;
}

export declare class RemoteTrack extends Track {}

// --- participants --------------------------------------------------------------------------

export interface CustomEvent {
  payload: string;
  /** Per space, increasing by one for every delivered event. */
  sequenceNumber: number;
  scope: CustomEventScope;
}

export interface ActiveSpeaker {
  participant: RemoteParticipant | LocalParticipant;
  track: RemoteTrack | LocalTrack;
}

declare class Participant extends Emitter {
  /** The `participant_id` of the token (or one the server made). Kept across reconnects. */
  id: string;
  /** New on every connection, reconnects included. */
  connectionId: string;
  role: ParticipantRole;
  displayName: string;
}

export declare class RemoteParticipant extends Participant {
  audioTracks: Map<string, RemoteTrack>;
  videoTracks: Map<string, RemoteTrack>;
  status: ParticipantStatus;
  getVideoTracks(): RemoteTrack[];
  getAudioTracks(): RemoteTrack[];
  getTracks(): RemoteTrack[];
  isSubscribed(): boolean;
  /** Manual subscription mode only: receive this participant's tracks, now and as they
   * publish. Resolves once the server agreed and the current tracks' media arrived. */
  subscribe(): Promise<void>;
  unsubscribe(): Promise<void>;
}

export declare class LocalParticipant extends Participant {
  audioTracks: Map<string, LocalTrack>;
  videoTracks: Map<string, LocalTrack>;
  getVideoTracks(): LocalTrack[];
  getAudioTracks(): LocalTrack[];
  getTracks(): LocalTrack[];
  /** Resolves once the server accepted the tracks; rejects with a PublishTrackError that
   * carries the server's message (a subscriber's token, a limit). */
  publishTracks(tracks: LocalTrack[]): Promise<LocalTrack[]>;
  /** Replace the media of published tracks by source, without renegotiating. */
  updateTracks(tracks: LocalTrack[]): LocalTrack[];
  /** Mux's returns void; this resolves once the server has been told. */
  unpublishTracks(tracks: LocalTrack[], options?: { stop: boolean }): Promise<void>;
  unpublishAllTracks(options?: { stop: boolean }): Promise<void>;
  /** A string of at most 4 KB to everyone (this page too). Resolves with the event as
   * delivered; rejects with PublishCustomEventError (code 6: rate limited). */
  publishCustomEvent(payload: string): Promise<CustomEvent>;
  /** At most 64 characters; rejects with SetDisplayNameError (code 8: rate limited). */
  setDisplayName(displayName: string): Promise<LocalParticipant>;
}

// --- the space -----------------------------------------------------------------------------

export interface SpaceOptionsParams {
  displayName?: string;
  /** Default: Automatic. */
  subscriptionMode?: SubscriptionMode;
  /** Automatic mode: receive at most this many participants (1..20, default 16). */
  automaticParticipantLimit?: number;
  /** Spaces only: where the signaling service is (ws, wss, http or https; `/v1` is added).
   * Default: the server this module was loaded from. */
  backendUrl?: string;
}

/** Spaces only: what {@link Space.setVideoQuality} may ask for. */
export declare const VideoQuality: {
  readonly Low: "low";
  readonly Medium: "medium";
  readonly High: "high";
  /** No video of the track. */
  readonly Off: "off";
  /** No limit: the best layer the link carries. */
  readonly Auto: "";
};
export type VideoQuality = (typeof VideoQuality)[keyof typeof VideoQuality];

export interface VideoQualityRequest {
  quality?: VideoQuality;
  /** The size the track is rendered at: the server sends the smallest layer that covers it. */
  width?: number;
  height?: number;
}

export type SpaceState = "new" | "joining" | "joined" | "reconnecting" | "closed" | "left";

export declare class Space extends Emitter {
  constructor(token: string, options?: SpaceOptionsParams);
  /** Set by join(). */
  localParticipant?: LocalParticipant;
  broadcasting: boolean;
  sessionId?: string;
  activeSpeakers: ActiveSpeaker[];
  /** Spaces only. */
  readonly state: SpaceState;
  /** Spaces only: everyone else in the space, by connection id. */
  readonly remoteParticipants: Map<string, RemoteParticipant>;
  /** Rejects with JWTError or ConnectionError carrying the server's error type and message. */
  join(): Promise<LocalParticipant>;
  leave(): void;
  /** Spaces only: whether this page receives audio only (see SpaceEvent.AudioOnlyChanged). */
  audioOnly: boolean;
  /** Spaces only: the most this page wants of a remote video track (a simulcast layer by
   * quality, or by the size it is rendered at). Kept across reconnects. */
  setVideoQuality(track: RemoteTrack, request?: VideoQualityRequest): void;
}

// --- media ---------------------------------------------------------------------------------

export interface LocalTrackOptions extends MediaTrackConstraints {
  name?: string;
  constraints?: MediaTrackConstraints;
}

export interface CreateLocalMediaOptions {
  audio?: LocalTrackOptions | boolean;
  video?: LocalTrackOptions | boolean;
}

/** Camera (source camera, at most 1280x720 by default) and microphone. */
export declare function getUserMedia(options?: CreateLocalMediaOptions): Promise<LocalTrack[]>;
/** A screen share: sources screenshare and screenshareaudio (at most 2560x1440 at 15 fps). */
export declare function getDisplayMedia(options?: CreateLocalMediaOptions): Promise<LocalTrack[]>;
export declare function getLocalTracksFromMediaStream(
  streamName: string,
  stream: MediaStream,
): Promise<LocalTrack[]>;
