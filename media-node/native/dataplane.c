/* spaces.media._dataplane: the media node's per-packet work in C.
 *
 * Peer:   one DTLS-SRTP association (libsrtp contexts, one per direction) and where to send.
 * Socket: one UDP socket read with recvmmsg; datagrams demultiplexed (RFC 7983) and routed by
 *         remote address to a Peer, everything else handed back to Python intact.
 * Source: one publisher track (keyframe detection, NACK history) fanned out to Downs.
 * Down:   one subscriber's view of a Source: header rewrite, protect, batched send.
 *
 * Everything runs on the event-loop thread with the GIL held. See INTERFACE.md.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <srtp2/srtp.h>

#define MAX_DATAGRAM 1500
#define SRTP_ROOM (MAX_DATAGRAM + SRTP_MAX_TRAILER_LEN + 16)
#define BATCH 32
#define MAX_READ_BATCHES 8
#define HISTORY 1024
#define RTX_MAX_AGE_NS 1000000000LL
#define MAX_ADDRS 64

static PyObject *DataplaneError; /* subclass of pylibsrtp.Error: aiortc catches that one */

/* --- counters, process-wide (what tests and metrics read) -------------------------------- */

static struct {
    unsigned long long datagrams_in, rtp_in, rtcp_in, fallback_in, unprotect_failed, malformed,
        rtp_out, datagrams_out, bytes_out, send_failed, send_would_block, rtp_forwarded,
        dropped_slow, dropped_waiting_keyframe, rtx_sent;
} counters;

static long long
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* NTP time as aiortc's current_ntp_time(): 32.32 fixed point since 1900. */
static unsigned long long
ntp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    unsigned long long secs = (unsigned long long)ts.tv_sec + 2208988800ULL;
    unsigned long long frac = ((unsigned long long)ts.tv_nsec << 32) / 1000000000ULL;
    return (secs << 32) | frac;
}

/* --- addresses ---------------------------------------------------------------------------- */

typedef struct {
    struct sockaddr_storage ss;
    socklen_t len;
} addr_t;

static int
addr_from_tuple(PyObject *tuple, addr_t *out)
{
    const char *host;
    int port;
    PyObject *first;
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) < 2) {
        PyErr_SetString(PyExc_TypeError, "address must be a (host, port) tuple");
        return -1;
    }
    first = PyTuple_GET_ITEM(tuple, 0);
    if (!PyUnicode_Check(first)) {
        PyErr_SetString(PyExc_TypeError, "address host must be a str");
        return -1;
    }
    host = PyUnicode_AsUTF8(first);
    if (host == NULL)
        return -1;
    port = (int)PyLong_AsLong(PyTuple_GET_ITEM(tuple, 1));
    if (port == -1 && PyErr_Occurred())
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return -1;
    }
    memset(out, 0, sizeof(*out));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&out->ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&out->ss;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        out->len = sizeof(*v4);
        return 0;
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        out->len = sizeof(*v6);
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "not an IP address: %s", host);
    return -1;
}

static PyObject *
addr_to_tuple(const struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &v4->sin_addr, host, sizeof(host));
        return Py_BuildValue("(si)", host, ntohs(v4->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof(host));
        return Py_BuildValue("(si)", host, ntohs(v6->sin6_port));
    }
    return Py_BuildValue("(si)", "", 0);
}

static int
addr_equal(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return 0;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a;
        const struct sockaddr_in *y = (const struct sockaddr_in *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a;
        const struct sockaddr_in6 *y = (const struct sockaddr_in6 *)b;
        return x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
    }
    return 0;
}

/* --- RTP helpers -------------------------------------------------------------------------- */

static inline uint16_t
rd16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}
static inline uint32_t
rd32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void
wr16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static inline void
wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline int
is_rtcp(const uint8_t *p, size_t n)
{
    return n >= 2 && p[1] >= 192 && p[1] <= 208;
}

/* A parsed plaintext RTP packet (pointers into its buffer). */
typedef struct {
    uint8_t marker, payload_type;
    uint16_t seq;
    uint32_t ts, ssrc;
    const uint8_t *payload;
    size_t payload_len;
    int level;    /* audio level 0-127, or -1 */
    int voice;    /* the V bit of the audio level */
} rtp_t;

/* Parses header, CSRCs, extensions (one- and two-byte), and padding. Returns 0 or -1. */
static int
rtp_parse(const uint8_t *p, size_t n, int level_id, rtp_t *out)
{
    size_t pos, end = n;
    int cc;
    if (n < 12 || (p[0] >> 6) != 2)
        return -1;
    cc = p[0] & 0x0F;
    out->marker = p[1] >> 7;
    out->payload_type = p[1] & 0x7F;
    out->seq = rd16(p + 2);
    out->ts = rd32(p + 4);
    out->ssrc = rd32(p + 8);
    out->level = -1;
    out->voice = 0;
    pos = 12 + 4 * (size_t)cc;
    if (pos > n)
        return -1;
    if (p[0] & 0x10) {
        uint16_t profile;
        size_t len, epos, eend;
        if (pos + 4 > n)
            return -1;
        profile = rd16(p + pos);
        len = 4 * (size_t)rd16(p + pos + 2);
        epos = pos + 4;
        eend = epos + len;
        if (eend > n)
            return -1;
        if (profile == 0xBEDE) {
            while (epos < eend) {
                uint8_t b = p[epos];
                int id = b >> 4, l = (b & 0x0F) + 1;
                if (b == 0) {
                    epos++;
                    continue;
                }
                if (id == 15)
                    break;
                if (epos + 1 + (size_t)l > eend)
                    return -1;
                if (level_id && id == level_id && l >= 1) {
                    out->level = p[epos + 1] & 0x7F;
                    out->voice = p[epos + 1] >> 7;
                }
                epos += 1 + (size_t)l;
            }
        } else if ((profile & 0xFFF0) == 0x1000) {
            while (epos + 1 < eend) {
                int id = p[epos], l = p[epos + 1];
                if (id == 0) {
                    epos++;
                    continue;
                }
                if (epos + 2 + (size_t)l > eend)
                    return -1;
                if (level_id && id == level_id && l >= 1) {
                    out->level = p[epos + 2] & 0x7F;
                    out->voice = p[epos + 2] >> 7;
                }
                epos += 2 + (size_t)l;
            }
        }
        pos = eend;
    }
    if (p[0] & 0x20) {
        size_t pad;
        if (end <= pos)
            return -1;
        pad = p[end - 1];
        if (pad == 0 || pad > end - pos)
            return -1;
        end -= pad;
    }
    out->payload = p + pos;
    out->payload_len = end - pos;
    return 0;
}

/* forwarding.py's keyframe detectors, in C (see there for the formats). */
static int
vp8_keyframe_start(const uint8_t *p, size_t n)
{
    size_t pos;
    if (n == 0)
        return 0;
    uint8_t first = p[0];
    if (!(first & 0x10) || (first & 0x0F))
        return 0;
    pos = 1;
    if (first & 0x80) {
        if (n < 2)
            return 0;
        uint8_t ext = p[1];
        pos = 2;
        if (ext & 0x80) {
            if (n <= pos)
                return 0;
            pos += (p[pos] & 0x80) ? 2 : 1;
        }
        if (ext & 0x40)
            pos += 1;
        if (ext & 0x30)
            pos += 1;
    }
    return n > pos && !(p[pos] & 0x01);
}

static int
h264_keyframe_start(const uint8_t *p, size_t n)
{
    if (n == 0)
        return 0;
    int type = p[0] & 0x1F;
    if (type == 5 || type == 7)
        return 1;
    if (type == 24) {
        size_t pos = 1;
        while (pos + 2 < n) {
            size_t size = ((size_t)p[pos] << 8) | p[pos + 1];
            if (size == 0 || pos + 2 >= n)
                break;
            int t = p[pos + 2] & 0x1F;
            if (t == 5 || t == 7)
                return 1;
            pos += 2 + size;
        }
        return 0;
    }
    if (type == 28 && n > 1) {
        int t = p[1] & 0x1F;
        return (p[1] & 0x80) && (t == 5 || t == 7);
    }
    return 0;
}

#define CODEC_OTHER 0
#define CODEC_VP8 1
#define CODEC_H264 2

static int
keyframe_start(int codec, const uint8_t *p, size_t n)
{
    if (codec == CODEC_VP8)
        return vp8_keyframe_start(p, n);
    if (codec == CODEC_H264)
        return h264_keyframe_start(p, n);
    return 0;
}

/* The shared part of an outgoing packet: one-byte extensions (abs-send-time, audio level),
 * as forwarding.py's extension_block(). Returns its length (0: no extension block). */
static size_t
write_extensions(uint8_t *out, int abs_id, int level_id, unsigned long long ntp, int level,
                 int voice)
{
    size_t body = 0;
    uint8_t *b = out + 4;
    if (abs_id) {
        uint32_t v = (uint32_t)((ntp >> 14) & 0x00FFFFFF);
        b[body++] = (uint8_t)((abs_id << 4) | 2);
        b[body++] = (uint8_t)(v >> 16);
        b[body++] = (uint8_t)(v >> 8);
        b[body++] = (uint8_t)v;
    }
    if (level_id && level >= 0) {
        b[body++] = (uint8_t)((level_id << 4) | 0);
        b[body++] = (uint8_t)((voice ? 0x80 : 0) | (level & 0x7F));
    }
    if (body == 0)
        return 0;
    while (body % 4)
        b[body++] = 0;
    wr16(out, 0xBEDE);
    wr16(out + 2, (uint16_t)(body / 4));
    return 4 + body;
}

/* --- SRTP --------------------------------------------------------------------------------- */

static int
srtp_context(srtp_t *ctx, int profile, const uint8_t *key, size_t key_len, int outbound)
{
    srtp_policy_t policy;
    memset(&policy, 0, sizeof(policy));
    if (srtp_crypto_policy_set_from_profile_for_rtp(&policy.rtp, (srtp_profile_t)profile) ||
        srtp_crypto_policy_set_from_profile_for_rtcp(&policy.rtcp, (srtp_profile_t)profile)) {
        PyErr_Format(PyExc_ValueError, "SRTP profile %d is not supported", profile);
        return -1;
    }
    if (key_len != (size_t)srtp_profile_get_master_key_length((srtp_profile_t)profile) +
                       (size_t)srtp_profile_get_master_salt_length((srtp_profile_t)profile)) {
        PyErr_SetString(PyExc_ValueError, "key has the wrong length for the SRTP profile");
        return -1;
    }
    policy.ssrc.type = outbound ? ssrc_any_outbound : ssrc_any_inbound;
    policy.key = (unsigned char *)key;
    policy.window_size = 1024;
    policy.allow_repeat_tx = 1;
    policy.next = NULL;
    srtp_err_status_t status = srtp_create(ctx, &policy);
    if (status) {
        PyErr_Format(DataplaneError, "srtp_create failed (%d)", (int)status);
        return -1;
    }
    return 0;
}


/* --- SRTP for RTP, AES_CM_128_HMAC_SHA1_80, on OpenSSL's AES and SHA-1 ----------------------
 * Debian's libsrtp2 is built with its own table-driven AES (no OpenSSL): 24 us to protect a
 * 1,200-byte packet here, against 16 us for pylibsrtp's bundled OpenSSL build. The RTP
 * direction (per packet, per subscriber) therefore runs on libcrypto (AES-NI): RFC 3711's key
 * derivation, counter mode and HMAC-SHA1-80, with libsrtp's index estimation and replay
 * window, byte for byte (tests/test_dataplane.py checks it against pylibsrtp). SRTCP stays
 * in libsrtp: its own keys and index, a few packets a second. */

#define FAST_STREAMS 16
#define REPLAY_WINDOW 1024
#define TAG_LEN 10

typedef struct {
    uint32_t ssrc;
    int used;
    uint64_t index;                       /* 48-bit extended sequence number, highest seen */
    uint64_t bitmap[REPLAY_WINDOW / 64];  /* bit (REPLAY_WINDOW-1) = index */
} fast_stream_t;

typedef struct {
    EVP_CIPHER_CTX *aes;
    uint8_t salt[14];
    SHA_CTX inner, outer;
    fast_stream_t streams[FAST_STREAMS];
    int next_evict;
    int inbound;
} fast_srtp_t;

static int
kdf(const uint8_t *master_key, const uint8_t *master_salt, int label, uint8_t *out, int n)
{
    uint8_t iv[16] = {0}, zeros[64] = {0};
    int len = 0;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return -1;
    memcpy(iv, master_salt, 14);
    iv[7] ^= (uint8_t)label;
    int ok = EVP_EncryptInit_ex(ctx, EVP_aes_128_ctr(), NULL, master_key, iv) &&
             EVP_EncryptUpdate(ctx, out, &len, zeros, n);
    EVP_CIPHER_CTX_free(ctx);
    return ok && len == n ? 0 : -1;
}

static int
fast_init(fast_srtp_t *f, const uint8_t *key30, int inbound)
{
    uint8_t enc[16], auth[20], pad[64];
    memset(f, 0, sizeof(*f));
    f->inbound = inbound;
    if (kdf(key30, key30 + 16, 0, enc, 16) || kdf(key30, key30 + 16, 1, auth, 20) ||
        kdf(key30, key30 + 16, 2, f->salt, 14))
        return -1;
    f->aes = EVP_CIPHER_CTX_new();
    if (f->aes == NULL || !EVP_EncryptInit_ex(f->aes, EVP_aes_128_ctr(), NULL, enc, NULL))
        return -1;
    memset(pad, 0x36, 64);
    for (int i = 0; i < 20; i++)
        pad[i] ^= auth[i];
    SHA1_Init(&f->inner);
    SHA1_Update(&f->inner, pad, 64);
    memset(pad, 0x5c, 64);
    for (int i = 0; i < 20; i++)
        pad[i] ^= auth[i];
    SHA1_Init(&f->outer);
    SHA1_Update(&f->outer, pad, 64);
    return 0;
}

static void
fast_free(fast_srtp_t *f)
{
    if (f->aes)
        EVP_CIPHER_CTX_free(f->aes);
    f->aes = NULL;
}

static fast_stream_t *
fast_stream(fast_srtp_t *f, uint32_t ssrc, int create)
{
    for (int i = 0; i < FAST_STREAMS; i++)
        if (f->streams[i].used && f->streams[i].ssrc == ssrc)
            return &f->streams[i];
    if (!create)
        return NULL;
    for (int i = 0; i < FAST_STREAMS; i++)
        if (!f->streams[i].used) {
            memset(&f->streams[i], 0, sizeof(f->streams[i]));
            f->streams[i].used = 1;
            f->streams[i].ssrc = ssrc;
            return &f->streams[i];
        }
    fast_stream_t *s = &f->streams[f->next_evict];
    f->next_evict = (f->next_evict + 1) % FAST_STREAMS;
    memset(s, 0, sizeof(*s));
    s->used = 1;
    s->ssrc = ssrc;
    return s;
}

/* libsrtp's srtp_rdbx_estimate_index: the guessed 48-bit index and its distance from the
 * highest one seen. */
static int
estimate_index(const fast_stream_t *s, uint16_t seq, uint64_t *guess)
{
    if (s->index > 0x8000) {
        uint32_t roc = (uint32_t)(s->index >> 16);
        uint16_t local = (uint16_t)s->index;
        uint32_t groc;
        int diff;
        if (local < 0x8000) {
            if ((int)seq - (int)local > 0x8000) {
                groc = roc - 1;
                diff = (int)seq - (int)local - 0x10000;
            } else {
                groc = roc;
                diff = (int)seq - (int)local;
            }
        } else {
            if ((int)local - 0x8000 > (int)seq) {
                groc = roc + 1;
                diff = (int)seq - (int)local + 0x10000;
            } else {
                groc = roc;
                diff = (int)seq - (int)local;
            }
        }
        *guess = ((uint64_t)groc << 16) | seq;
        return diff;
    }
    *guess = seq;
    return (int)seq - (int)(uint16_t)s->index;
}

static inline int
replay_bit(const fast_stream_t *s, int pos)
{
    return (int)((s->bitmap[pos / 64] >> (pos % 64)) & 1);
}

static inline void
replay_set(fast_stream_t *s, int pos)
{
    s->bitmap[pos / 64] |= 1ULL << (pos % 64);
}

static void
replay_shift(fast_stream_t *s, int delta)
{
    /* bit i moves to bit i - delta (the window's top is bit REPLAY_WINDOW - 1) */
    uint64_t out[REPLAY_WINDOW / 64] = {0};
    if (delta < REPLAY_WINDOW) {
        int words = delta / 64, bits = delta % 64, n = REPLAY_WINDOW / 64;
        for (int i = 0; i < n; i++) {
            int src = i + words;
            if (src >= n)
                break;
            uint64_t v = s->bitmap[src] >> bits;
            if (bits && src + 1 < n)
                v |= s->bitmap[src + 1] << (64 - bits);
            out[i] = v;
        }
    }
    memcpy(s->bitmap, out, sizeof(out));
}

static void
add_index(fast_stream_t *s, int delta)
{
    if (delta > 0) {
        s->index = (s->index + (uint64_t)delta) & 0xFFFFFFFFFFFFULL;
        replay_shift(s, delta);
        replay_set(s, REPLAY_WINDOW - 1);
    } else {
        replay_set(s, REPLAY_WINDOW - 1 + delta);
    }
}

static size_t
rtp_header_len(const uint8_t *p, size_t n)
{
    size_t pos;
    if (n < 12)
        return 0;
    pos = 12 + 4 * (size_t)(p[0] & 0x0F);
    if (p[0] & 0x10) {
        if (pos + 4 > n)
            return 0;
        pos += 4 + 4 * (size_t)rd16(p + pos + 2);
    }
    return pos <= n ? pos : 0;
}

static int
fast_crypt(fast_srtp_t *f, uint8_t *p, size_t start, size_t end, uint32_t ssrc, uint64_t index)
{
    uint8_t iv[16];
    int len = 0;
    memcpy(iv, f->salt, 14);
    iv[14] = iv[15] = 0;
    iv[4] ^= (uint8_t)(ssrc >> 24);
    iv[5] ^= (uint8_t)(ssrc >> 16);
    iv[6] ^= (uint8_t)(ssrc >> 8);
    iv[7] ^= (uint8_t)ssrc;
    for (int i = 0; i < 6; i++)
        iv[8 + i] ^= (uint8_t)(index >> (40 - 8 * i));
    if (end <= start)
        return 0;
    if (!EVP_EncryptInit_ex(f->aes, NULL, NULL, NULL, iv) ||
        !EVP_EncryptUpdate(f->aes, p + start, &len, p + start, (int)(end - start)))
        return -1;
    return 0;
}

static void
fast_tag(fast_srtp_t *f, const uint8_t *p, size_t n, uint32_t roc, uint8_t *tag)
{
    SHA_CTX ctx;
    uint8_t digest[20], r[4];
    wr32(r, roc);
    ctx = f->inner;
    SHA1_Update(&ctx, p, n);
    SHA1_Update(&ctx, r, 4);
    SHA1_Final(digest, &ctx);
    ctx = f->outer;
    SHA1_Update(&ctx, digest, 20);
    SHA1_Final(digest, &ctx);
    memcpy(tag, digest, TAG_LEN);
}

/* Protect in place; *len grows by the tag. 0, or an srtp_err_status_t. */
static int
fast_protect(fast_srtp_t *f, uint8_t *p, int *len)
{
    size_t n = (size_t)*len, hlen = rtp_header_len(p, n);
    uint64_t guess;
    if (hlen == 0)
        return srtp_err_status_bad_param;
    uint32_t ssrc = rd32(p + 8);
    fast_stream_t *s = fast_stream(f, ssrc, 1);
    int delta = estimate_index(s, rd16(p + 2), &guess);
    /* allow_repeat_tx: a repeated index is sent again, as libsrtp's sender does */
    if (delta > 0 || (delta > -REPLAY_WINDOW && !replay_bit(s, REPLAY_WINDOW - 1 + delta)))
        add_index(s, delta);
    else if (delta <= -REPLAY_WINDOW)
        return srtp_err_status_replay_old;
    if (fast_crypt(f, p, hlen, n, ssrc, guess))
        return srtp_err_status_cipher_fail;
    fast_tag(f, p, n, (uint32_t)(guess >> 16), p + n);
    *len = (int)(n + TAG_LEN);
    return 0;
}

static int
fast_unprotect(fast_srtp_t *f, uint8_t *p, int *len)
{
    size_t n = (size_t)*len, hlen;
    uint8_t tag[TAG_LEN];
    uint64_t guess;
    fast_stream_t probe, *s;
    if (n < 12 + TAG_LEN)
        return srtp_err_status_bad_param;
    n -= TAG_LEN;
    hlen = rtp_header_len(p, n);
    if (hlen == 0)
        return srtp_err_status_bad_param;
    uint32_t ssrc = rd32(p + 8);
    s = fast_stream(f, ssrc, 0);
    if (s == NULL) {
        memset(&probe, 0, sizeof(probe));
        s = &probe;
    }
    int delta = estimate_index(s, rd16(p + 2), &guess);
    if (delta <= -REPLAY_WINDOW)
        return srtp_err_status_replay_old;
    if (delta <= 0 && replay_bit(s, REPLAY_WINDOW - 1 + delta))
        return srtp_err_status_replay_fail;
    fast_tag(f, p, n, (uint32_t)(guess >> 16), tag);
    if (CRYPTO_memcmp(tag, p + n, TAG_LEN) != 0)
        return srtp_err_status_auth_fail;
    if (fast_crypt(f, p, hlen, n, ssrc, guess))
        return srtp_err_status_cipher_fail;
    if (s == &probe) {
        s = fast_stream(f, ssrc, 1);
        *s = probe;
        s->used = 1;
        s->ssrc = ssrc;
    }
    add_index(s, delta);
    *len = (int)n;
    return 0;
}

/* --- Peer --------------------------------------------------------------------------------- */

typedef struct PeerObject {
    PyObject_HEAD
    srtp_t rx, tx;         /* libsrtp: SRTCP (and RTP for profiles without a fast path) */
    fast_srtp_t frx, ftx;  /* RTP, AES_CM_128_HMAC_SHA1_80 */
    int fast;
    int fd;
    addr_t addr;
    PyObject *on_rtcp; /* called with each decrypted compound RTCP packet */
    PyObject *on_rtp;  /* called with decrypted RTP no Source claims */
    struct SourceObject **sources;
    Py_ssize_t nsources;
    unsigned long long rtp_out, rtcp_out, bytes_out, rtp_in, rtcp_in;
} PeerObject;

static PyTypeObject PeerType;

static int
Peer_init(PeerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"profile", "rx_key", "tx_key", NULL};
    int profile;
    Py_buffer rx, tx;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iy*y*", kwlist, &profile, &rx, &tx))
        return -1;
    int failed = srtp_context(&self->rx, profile, rx.buf, (size_t)rx.len, 0) ||
                 srtp_context(&self->tx, profile, tx.buf, (size_t)tx.len, 1);
    if (!failed && profile == srtp_profile_aes128_cm_sha1_80) {
        if (fast_init(&self->frx, rx.buf, 1) || fast_init(&self->ftx, tx.buf, 0)) {
            PyErr_SetString(DataplaneError, "OpenSSL AES/SHA-1 setup failed");
            failed = 1;
        } else
            self->fast = 1;
    }
    PyBuffer_Release(&rx);
    PyBuffer_Release(&tx);
    if (failed)
        return -1;
    self->fd = -1;
    Py_INCREF(Py_None);
    self->on_rtcp = Py_None;
    Py_INCREF(Py_None);
    self->on_rtp = Py_None;
    return 0;
}

static void
Peer_dealloc(PeerObject *self)
{
    if (self->rx)
        srtp_dealloc(self->rx);
    if (self->tx)
        srtp_dealloc(self->tx);
    fast_free(&self->frx);
    fast_free(&self->ftx);
    Py_XDECREF(self->on_rtcp);
    Py_XDECREF(self->on_rtp);
    PyMem_Free(self->sources);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

typedef srtp_err_status_t (*srtp_fn)(srtp_t, void *, int *);
typedef int (*fast_fn)(fast_srtp_t *, uint8_t *, int *);

static int
peer_protect_rtp(PeerObject *self, uint8_t *buf, int *len)
{
    if (self->fast)
        return fast_protect(&self->ftx, buf, len);
    return (int)srtp_protect(self->tx, buf, len);
}

static int
peer_unprotect_rtp(PeerObject *self, uint8_t *buf, int *len)
{
    if (self->fast)
        return fast_unprotect(&self->frx, buf, len);
    return (int)srtp_unprotect(self->rx, buf, len);
}

static PyObject *
peer_transform(srtp_t ctx, PyObject *arg, srtp_fn fn, int grow, const char *what,
               PeerObject *fast_peer, int (*fast)(PeerObject *, uint8_t *, int *))
{
    Py_buffer in;
    uint8_t buf[SRTP_ROOM];
    int len;
    if (PyObject_GetBuffer(arg, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    if (in.len > MAX_DATAGRAM || in.len < (grow ? 8 : 4)) {
        PyBuffer_Release(&in);
        PyErr_Format(DataplaneError, "%s: bad packet length", what);
        return NULL;
    }
    memcpy(buf, in.buf, (size_t)in.len);
    len = (int)in.len;
    PyBuffer_Release(&in);
    int status = fast ? fast(fast_peer, buf, &len) : (int)fn(ctx, buf, &len);
    if (status) {
        PyErr_Format(DataplaneError, "%s failed (%d)", what, (int)status);
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)buf, len);
}

static PyObject *
Peer_protect(PeerObject *self, PyObject *arg)
{
    return peer_transform(self->tx, arg, NULL, 1, "srtp_protect", self, peer_protect_rtp);
}
static PyObject *
Peer_protect_rtcp(PeerObject *self, PyObject *arg)
{
    return peer_transform(self->tx, arg, srtp_protect_rtcp, 1, "srtp_protect_rtcp", NULL, NULL);
}
static PyObject *
Peer_unprotect(PeerObject *self, PyObject *arg)
{
    return peer_transform(self->rx, arg, NULL, 0, "srtp_unprotect", self, peer_unprotect_rtp);
}
static PyObject *
Peer_unprotect_rtcp(PeerObject *self, PyObject *arg)
{
    return peer_transform(self->rx, arg, srtp_unprotect_rtcp, 0, "srtp_unprotect_rtcp", NULL,
                          NULL);
}

static PyObject *
Peer_set_route(PeerObject *self, PyObject *args)
{
    int fd;
    PyObject *addr;
    addr_t parsed;
    if (!PyArg_ParseTuple(args, "iO", &fd, &addr))
        return NULL;
    if (addr_from_tuple(addr, &parsed) < 0)
        return NULL;
    self->fd = fd;
    self->addr = parsed;
    Py_RETURN_NONE;
}

/* Send one finished datagram to the peer: 0, or errno. */
static int
peer_sendto(PeerObject *self, const uint8_t *data, size_t len)
{
    ssize_t sent;
    if (self->fd < 0)
        return EBADF;
    sent = sendto(self->fd, data, len, 0, (struct sockaddr *)&self->addr.ss, self->addr.len);
    if (sent < 0) {
        int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK)
            counters.send_would_block++;
        else
            counters.send_failed++;
        return err;
    }
    counters.datagrams_out++;
    counters.bytes_out += len;
    self->bytes_out += len;
    return 0;
}

/* send_rtp(first, second, seq, timestamp, ssrc, tail) -> None | bytes
 * Writes the 12-byte header before ``tail`` (extensions + payload), protects, and sends to the
 * route. None when sent; the protected datagram when the socket would block (the caller queues
 * it behind asyncio's buffer, keeping order); OSError on any other failure. */
static PyObject *
Peer_send_rtp(PeerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint8_t buf[SRTP_ROOM];
    Py_buffer tail;
    int len, err;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "send_rtp takes 6 arguments");
        return NULL;
    }
    unsigned long first = PyLong_AsUnsignedLong(args[0]);
    unsigned long second = PyLong_AsUnsignedLong(args[1]);
    unsigned long seq = PyLong_AsUnsignedLong(args[2]);
    unsigned long ts = PyLong_AsUnsignedLong(args[3]);
    unsigned long ssrc = PyLong_AsUnsignedLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[5], &tail, PyBUF_SIMPLE) < 0)
        return NULL;
    if (tail.len > MAX_DATAGRAM - 12) {
        PyBuffer_Release(&tail);
        PyErr_SetString(DataplaneError, "send_rtp: packet too large");
        return NULL;
    }
    buf[0] = (uint8_t)first;
    buf[1] = (uint8_t)second;
    wr16(buf + 2, (uint16_t)seq);
    wr32(buf + 4, (uint32_t)ts);
    wr32(buf + 8, (uint32_t)ssrc);
    memcpy(buf + 12, tail.buf, (size_t)tail.len);
    len = 12 + (int)tail.len;
    PyBuffer_Release(&tail);
    int status = peer_protect_rtp(self, buf, &len);
    if (status) {
        PyErr_Format(DataplaneError, "srtp_protect failed (%d)", status);
        return NULL;
    }
    self->rtp_out++;
    counters.rtp_out++;
    err = peer_sendto(self, buf, (size_t)len);
    if (err == 0)
        Py_RETURN_NONE;
    if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR)
        return PyBytes_FromStringAndSize((const char *)buf, len);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *
Peer_get_addr(PeerObject *self, void *closure)
{
    (void)closure;
    if (self->fd < 0)
        Py_RETURN_NONE;
    return addr_to_tuple(&self->addr.ss);
}

static PyMethodDef Peer_methods[] = {
    {"protect", (PyCFunction)Peer_protect, METH_O, "SRTP-protect an RTP packet."},
    {"protect_rtcp", (PyCFunction)Peer_protect_rtcp, METH_O, "SRTCP-protect an RTCP packet."},
    {"unprotect", (PyCFunction)Peer_unprotect, METH_O, "SRTP-unprotect."},
    {"unprotect_rtcp", (PyCFunction)Peer_unprotect_rtcp, METH_O, "SRTCP-unprotect."},
    {"set_route", (PyCFunction)Peer_set_route, METH_VARARGS, "set_route(fd, (host, port))"},
    {"send_rtp", (PyCFunction)(void (*)(void))Peer_send_rtp, METH_FASTCALL,
     "send_rtp(first, second, seq, timestamp, ssrc, tail) -> None | bytes"},
    {NULL}};

static PyMemberDef Peer_members[] = {
    {"rtp_out", T_ULONGLONG, offsetof(PeerObject, rtp_out), READONLY, NULL},
    {"bytes_out", T_ULONGLONG, offsetof(PeerObject, bytes_out), READONLY, NULL},
    {"rtp_in", T_ULONGLONG, offsetof(PeerObject, rtp_in), READONLY, NULL},
    {"rtcp_in", T_ULONGLONG, offsetof(PeerObject, rtcp_in), READONLY, NULL},
    {NULL}};

static PyGetSetDef Peer_getset[] = {{"addr", (getter)Peer_get_addr, NULL, NULL, NULL}, {NULL}};

static PyTypeObject PeerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "spaces.media._dataplane.Peer",
    .tp_basicsize = sizeof(PeerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Peer_init,
    .tp_dealloc = (destructor)Peer_dealloc,
    .tp_methods = Peer_methods,
    .tp_members = Peer_members,
    .tp_getset = Peer_getset,
};

/* --- module ------------------------------------------------------------------------------- */

static PyObject *
dp_counters(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsK}", "datagrams_in", counters.datagrams_in, "rtp_in",
        counters.rtp_in, "rtcp_in", counters.rtcp_in, "fallback_in", counters.fallback_in,
        "unprotect_failed", counters.unprotect_failed, "malformed", counters.malformed, "rtp_out",
        counters.rtp_out, "datagrams_out", counters.datagrams_out, "bytes_out",
        counters.bytes_out, "send_failed", counters.send_failed, "send_would_block",
        counters.send_would_block, "rtp_forwarded", counters.rtp_forwarded, "dropped_slow",
        counters.dropped_slow, "dropped_waiting_keyframe", counters.dropped_waiting_keyframe,
        "rtx_sent", counters.rtx_sent);
}

static PyObject *
dp_ntp_now(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromUnsignedLongLong(ntp_now());
}

static PyMethodDef module_methods[] = {
    {"counters", dp_counters, METH_NOARGS, "The process-wide packet counters."},
    {"ntp_now", dp_ntp_now, METH_NOARGS, "NTP time, 32.32 fixed point."},
    {NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "spaces.media._dataplane",
    "The media node's per-packet work (SRTP, RTP rewrite, batched UDP) in C.", -1,
    module_methods};

PyMODINIT_FUNC
PyInit__dataplane(void)
{
    PyObject *m, *pylibsrtp, *base;
    if (srtp_init() != srtp_err_status_ok) {
        PyErr_SetString(PyExc_ImportError, "srtp_init failed");
        return NULL;
    }
    pylibsrtp = PyImport_ImportModule("pylibsrtp");
    if (pylibsrtp == NULL)
        return NULL;
    base = PyObject_GetAttrString(pylibsrtp, "Error");
    Py_DECREF(pylibsrtp);
    if (base == NULL)
        return NULL;
    DataplaneError = PyErr_NewException("spaces.media._dataplane.Error", base, NULL);
    Py_DECREF(base);
    if (DataplaneError == NULL)
        return NULL;
    if (PyType_Ready(&PeerType) < 0)
        return NULL;
    m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(DataplaneError);
    PyModule_AddObject(m, "Error", DataplaneError);
    Py_INCREF(&PeerType);
    PyModule_AddObject(m, "Peer", (PyObject *)&PeerType);
    PyModule_AddIntConstant(m, "PROFILE_AES128_CM_SHA1_80", srtp_profile_aes128_cm_sha1_80);
    PyModule_AddIntConstant(m, "BATCH", BATCH);
    PyModule_AddIntConstant(m, "HISTORY", HISTORY);
    return m;
}
