"""The error catalogue: every failure a client can see, bound to one gRPC status code.

Servicers and libraries raise these; ``ErrorInterceptor`` (spaces.server_support) turns them into
``context.abort(code, message)`` in one place. Messages are short, lower-case and say what to do.
"""

from __future__ import annotations

import grpc


class SpacesError(Exception):
    """Base of all catalogued errors."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    message: str = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or type(self).message
        super().__init__(self.message)

    @property
    def code_name(self) -> str:
        return self.code.name


# --- by status code --------------------------------------------------------------------------


class InvalidArgument(SpacesError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    message = "invalid argument"


class Unauthenticated(SpacesError):
    code = grpc.StatusCode.UNAUTHENTICATED
    message = "unauthenticated"


class PermissionDenied(SpacesError):
    code = grpc.StatusCode.PERMISSION_DENIED
    message = "permission denied"


class NotFound(SpacesError):
    code = grpc.StatusCode.NOT_FOUND
    message = "not found"


class AlreadyExists(SpacesError):
    code = grpc.StatusCode.ALREADY_EXISTS
    message = "already exists"


class ResourceExhausted(SpacesError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    message = "resource exhausted"


class FailedPrecondition(SpacesError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    message = "failed precondition"


class Unavailable(SpacesError):
    code = grpc.StatusCode.UNAVAILABLE
    message = "unavailable"


class Internal(SpacesError):
    code = grpc.StatusCode.INTERNAL
    message = "internal error"


# --- admin credential ------------------------------------------------------------------------


class MissingAdminKey(Unauthenticated):
    message = "missing admin key: send metadata 'authorization: Bearer <admin key>'"


class WrongAdminKey(Unauthenticated):
    message = "wrong admin key"


# --- spaces ----------------------------------------------------------------------------------


class SpaceNotFound(NotFound):
    message = "space not found"


class SpaceActive(FailedPrecondition):
    message = "space is active: disconnect its participants or delete with force=true"


class PassthroughTooLong(InvalidArgument):
    message = "passthrough is longer than 255 characters"


class InvalidId(InvalidArgument):
    message = "malformed id"


class InvalidPageToken(InvalidArgument):
    message = "malformed page_token: pass next_page_token from the previous page"


class InvalidLimit(InvalidArgument):
    message = "limit is out of range"


# --- signing keys and tokens -----------------------------------------------------------------


class SigningKeyNotFound(NotFound):
    message = "signing key not found"


class InvalidToken(Unauthenticated):
    """Base of every token failure; the message says which check failed."""

    message = "invalid token"


class MalformedToken(InvalidToken):
    message = "malformed token: expected a JWT signed with RS256"


class TokenTooLarge(InvalidToken):
    message = "token is too large"


class TokenAlgorithmNotAllowed(InvalidToken):
    message = "token algorithm not allowed: sign with RS256"


class TokenMissingKeyId(InvalidToken):
    message = "token has no kid: put the signing key id in the header or payload"


class TokenUnknownKey(InvalidToken):
    message = "token signing key is unknown or revoked"


class TokenBadSignature(InvalidToken):
    message = "token signature does not verify with its signing key"


class TokenExpired(InvalidToken):
    message = "token has expired: sign a new one"


class TokenMissingClaim(InvalidToken):
    message = "token is missing a required claim"


class TokenWrongAudience(InvalidToken):
    message = 'token audience must be "rt"'


class TokenInvalidClaim(InvalidToken):
    message = "token has an invalid claim"


# --- presence --------------------------------------------------------------------------------


class DuplicateParticipant(AlreadyExists):
    message = "participant_id is already connected to this space"


class ParticipantLimitReached(ResourceExhausted):
    message = "space is full: participant limit reached"


class NoMediaNode(Unavailable):
    message = "no media node available: start a media node or wait for one to become ready"


class NoMediaCapacity(ResourceExhausted):
    message = "every media node is at capacity"


class BadResumeSecret(PermissionDenied):
    message = "resume secret does not match this participant's connection"


class ParticipantNotFound(NotFound):
    message = "participant not found"


class ConnectionNotFound(NotFound):
    message = "connection not found or already ended"


class DisplayNameTooLong(InvalidArgument):
    message = "display_name is longer than 64 characters"


class StoreUnavailable(Unavailable):
    message = "state store unavailable: retry shortly"


# --- media sessions --------------------------------------------------------------------------


class InvalidTicket(Unauthenticated):
    message = "invalid or expired ticket: call PresenceService.Join again"


class TicketWrongNode(PermissionDenied):
    message = "ticket is for another media node: connect to the media_address from Join"


class SubscriberCannotPublish(PermissionDenied):
    message = "subscriber role cannot publish tracks"


class SubscriberCannotSendEvents(PermissionDenied):
    message = "subscriber role cannot send custom events"


class CustomEventTooLarge(InvalidArgument):
    message = "custom event payload is larger than 4096 bytes"


class CustomEventRateLimited(ResourceExhausted):
    message = "custom events are rate limited: slow down"


class DisplayNameRateLimited(ResourceExhausted):
    message = "display name changes are rate limited: wait before changing it again"


class TrackLimitReached(ResourceExhausted):
    message = "too many tracks for this source"


class InvalidSdp(InvalidArgument):
    message = "invalid sdp"


class UnsupportedCodec(InvalidArgument):
    message = "no supported codec: offer opus, VP8 or H264"


class TrackNotFound(NotFound):
    message = "track not found"


class NodeDraining(Unavailable):
    message = "media node is draining: join again to be placed on another node"


# --- broadcasts ------------------------------------------------------------------------------


class BroadcastNotFound(NotFound):
    message = "broadcast not found"


class BroadcastActive(FailedPrecondition):
    message = "broadcast is active: stop it before deleting it"


class SpaceIdle(FailedPrecondition):
    message = "space is idle: start a broadcast once a participant has joined the space"


class BroadcastLimitReached(ResourceExhausted):
    message = "this space has as many broadcasts as allowed: delete one first"


class BroadcastLeaseLost(FailedPrecondition):
    message = "this worker no longer holds the broadcast"


class InvalidRtmpUrl(InvalidArgument):
    message = "rtmp_url must be rtmp:// or rtmps://host[:port]/app[/stream key]"


class InvalidBackground(InvalidArgument):
    message = "background must be a png or jpeg image"


# --- webhooks --------------------------------------------------------------------------------


class WebhookEndpointNotFound(NotFound):
    message = "webhook endpoint not found"


class InvalidWebhookUrl(InvalidArgument):
    message = "url must be an absolute http:// or https:// url"


class UnknownWebhookEventType(InvalidArgument):
    message = "unknown event type: use Mux names such as video.space.idle"


class WebhookSecretTooLong(InvalidArgument):
    message = "secret is longer than 256 characters"


class ConfigWebhookEndpoint(FailedPrecondition):
    message = "this endpoint comes from SPACES_WEBHOOK_URL: change the configuration to remove it"
