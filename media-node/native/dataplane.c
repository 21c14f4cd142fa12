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
#include <sys/mman.h>
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
/* a video source's history: the packets, their arrival times and lengths, in one mapping */
#define HISTORY_MAP ((size_t)HISTORY * (MAX_DATAGRAM + sizeof(long long) + sizeof(uint16_t)))
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

/* Where a VP8 payload descriptor (RFC 7741) keeps its picture id and TL0PICIDX: forwarding.py
 * vp8_descriptor. */
typedef struct {
    int pic_pos, tl0_pos; /* offsets into the payload, or -1 */
    int pic, tl0;
    int long_pic; /* a 15-bit picture id */
} vp8_t;

static int
vp8_parse(const uint8_t *p, size_t n, vp8_t *out)
{
    size_t pos = 2;
    out->pic_pos = out->tl0_pos = -1;
    out->pic = out->tl0 = out->long_pic = 0;
    if (n < 3 || !(p[0] & 0x80))
        return 0;
    uint8_t ext = p[1];
    if (ext & 0x80) {
        out->pic_pos = (int)pos;
        if (p[pos] & 0x80) {
            if (n < pos + 2)
                return 0;
            out->long_pic = 1;
            out->pic = ((p[pos] & 0x7F) << 8) | p[pos + 1];
            pos += 2;
        } else {
            out->pic = p[pos] & 0x7F;
            pos += 1;
        }
    }
    if (ext & 0x40) {
        if (n <= pos) {
            out->pic_pos = -1;
            return 0;
        }
        out->tl0_pos = (int)pos;
        out->tl0 = p[pos];
    }
    return out->pic_pos >= 0 || out->tl0_pos >= 0;
}

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

typedef struct SourceObject SourceObject;
typedef struct DownObject DownObject;

typedef struct {
    uint32_t ssrc;
    SourceObject *source; /* strong */
} source_slot_t;

typedef struct PeerObject {
    PyObject_HEAD
    int keyed;
    srtp_t rx, tx;         /* libsrtp: SRTCP (and RTP for profiles without a fast path) */
    fast_srtp_t frx, ftx;  /* RTP, AES_CM_128_HMAC_SHA1_80 */
    int fast;
    int fd;
    addr_t addr;
    PyObject *on_rtcp; /* called with each decrypted compound RTCP packet */
    PyObject *on_rtp;  /* called with decrypted RTP no Source claims, and its arrival (ms) */
    PyObject *sender;  /* without a socket of its own (TURN): called with each datagram */
    source_slot_t *sources;
    Py_ssize_t nsources;
    unsigned long long rtp_out, bytes_out, rtp_in, rtcp_in;
} PeerObject;

static PyTypeObject PeerType;
static int Peer_clear(PeerObject *self);

static int
peer_set_keys(PeerObject *self, int profile, Py_buffer *rx, Py_buffer *tx)
{
    if (self->keyed) {
        PyErr_SetString(DataplaneError, "the peer already has its keys");
        return -1;
    }
    int failed = srtp_context(&self->rx, profile, rx->buf, (size_t)rx->len, 0) ||
                 srtp_context(&self->tx, profile, tx->buf, (size_t)tx->len, 1);
    if (!failed && profile == srtp_profile_aes128_cm_sha1_80) {
        if (fast_init(&self->frx, rx->buf, 1) || fast_init(&self->ftx, tx->buf, 0)) {
            PyErr_SetString(DataplaneError, "OpenSSL AES/SHA-1 setup failed");
            failed = 1;
        } else
            self->fast = 1;
    }
    if (failed)
        return -1;
    self->keyed = 1;
    return 0;
}

static int
Peer_init(PeerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"profile", "rx_key", "tx_key", NULL};
    int profile = -1;
    Py_buffer rx = {0}, tx = {0};
    int failed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|iy*y*", kwlist, &profile, &rx, &tx))
        return -1;
    self->fd = -1;
    Py_INCREF(Py_None);
    self->on_rtcp = Py_None;
    Py_INCREF(Py_None);
    self->on_rtp = Py_None;
    if (profile != -1) {
        if (rx.buf == NULL || tx.buf == NULL) {
            PyErr_SetString(PyExc_TypeError, "Peer(profile, rx_key, tx_key), or Peer()");
            failed = 1;
        } else
            failed = peer_set_keys(self, profile, &rx, &tx) < 0;
    }
    if (rx.buf)
        PyBuffer_Release(&rx);
    if (tx.buf)
        PyBuffer_Release(&tx);
    return failed ? -1 : 0;
}

static PyObject *
Peer_set_keys(PeerObject *self, PyObject *args)
{
    int profile, failed;
    Py_buffer rx, tx;
    if (!PyArg_ParseTuple(args, "iy*y*", &profile, &rx, &tx))
        return NULL;
    failed = peer_set_keys(self, profile, &rx, &tx) < 0;
    PyBuffer_Release(&rx);
    PyBuffer_Release(&tx);
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Peer_set_handlers(PeerObject *self, PyObject *args)
{
    PyObject *on_rtp, *on_rtcp;
    if (!PyArg_ParseTuple(args, "OO", &on_rtp, &on_rtcp))
        return NULL;
    Py_INCREF(on_rtp);
    Py_XSETREF(self->on_rtp, on_rtp);
    Py_INCREF(on_rtcp);
    Py_XSETREF(self->on_rtcp, on_rtcp);
    Py_RETURN_NONE;
}

static void peer_clear_sources(PeerObject *self);

static PyObject *
Peer_set_sender(PeerObject *self, PyObject *arg)
{
    if (arg == Py_None)
        Py_CLEAR(self->sender);
    else {
        Py_INCREF(arg);
        Py_XSETREF(self->sender, arg);
        self->fd = -1;
    }
    Py_RETURN_NONE;
}

static inline int
peer_routed(PeerObject *p)
{
    return p->keyed && (p->fd >= 0 || p->sender != NULL);
}

static void
Peer_dealloc(PeerObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->rx)
        srtp_dealloc(self->rx);
    if (self->tx)
        srtp_dealloc(self->tx);
    fast_free(&self->frx);
    fast_free(&self->ftx);
    Py_XDECREF(self->on_rtcp);
    Py_XDECREF(self->on_rtp);
    Py_XDECREF(self->sender);
    peer_clear_sources(self);
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
peer_transform(PeerObject *self, int tx, PyObject *arg, srtp_fn fn, int grow, const char *what,
               int (*fast)(PeerObject *, uint8_t *, int *))
{
    Py_buffer in;
    uint8_t buf[SRTP_ROOM];
    int len;
    if (!self->keyed) {
        PyErr_Format(DataplaneError, "%s: the peer has no keys yet", what);
        return NULL;
    }
    srtp_t ctx = tx ? self->tx : self->rx;
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
    int status = fast ? fast(self, buf, &len) : (int)fn(ctx, buf, &len);
    if (status) {
        PyErr_Format(DataplaneError, "%s failed (%d)", what, (int)status);
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)buf, len);
}

static PyObject *
Peer_protect(PeerObject *self, PyObject *arg)
{
    return peer_transform(self, 1, arg, NULL, 1, "srtp_protect", peer_protect_rtp);
}
static PyObject *
Peer_protect_rtcp(PeerObject *self, PyObject *arg)
{
    return peer_transform(self, 1, arg, srtp_protect_rtcp, 1, "srtp_protect_rtcp", NULL);
}
static PyObject *
Peer_unprotect(PeerObject *self, PyObject *arg)
{
    return peer_transform(self, 0, arg, NULL, 0, "srtp_unprotect", peer_unprotect_rtp);
}
static PyObject *
Peer_unprotect_rtcp(PeerObject *self, PyObject *arg)
{
    return peer_transform(self, 0, arg, srtp_unprotect_rtcp, 0, "srtp_unprotect_rtcp", NULL);
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
    Py_CLEAR(self->sender);
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
    if (!self->keyed) {
        PyBuffer_Release(&tail);
        PyErr_SetString(DataplaneError, "send_rtp: the peer has no keys yet");
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

/* --- the outgoing batch: sendmmsg per socket ----------------------------------------------
 * Packets a fan-out produces are queued here and sent together (one sendmmsg per run of one
 * socket) when the batch fills or the read/inject that produced them ends. Each entry holds
 * its peer and down, so Python code run meanwhile (callbacks) cannot free them. */

typedef struct {
    uint8_t buf[SRTP_ROOM];
    int len;
    int skip; /* not to be sent: its down fell behind earlier in this batch */
    size_t payload_len;
    PeerObject *peer;
    DownObject *down;
    /* the down's continuity and report state before this packet, to rewind to if the
     * packet cannot be sent (so the subscriber sees no sequence gap and the sender reports
     * count only what went out) */
    uint16_t prev_seq;
    int prev_pic, prev_tl0;
    uint32_t prev_ts, prev_rtp_ts;
    long long prev_at;
    unsigned long long prev_ntp;
} out_t;

static out_t out_batch[BATCH];
static int out_count;
static void out_flush(void);
static void down_fall_behind(DownObject *down);

static void
out_queue_done(out_t *o)
{
    Py_CLEAR(o->peer);
    Py_CLEAR(o->down);
}

/* --- Source and Down ------------------------------------------------------------------------ */

#define MISSING_MAX 128

struct SourceObject {
    PyObject_HEAD
    int codec, clock_rate, level_id, is_video, paused, closed;
    int rewrite_vp8; /* a simulcast layer: picture ids continue per down across switches */
    DownObject **downs;
    Py_ssize_t ndowns, cap;
    DownObject **switching; /* strong: downs that switch to this source at its next keyframe */
    Py_ssize_t nswitching, switching_cap;
    long long last_at; /* monotonic ns of the newest packet with a payload */
    PyObject *on_keyframe, *on_level, *on_nack, *on_behind;
    /* aiortc's StreamStatistics, for its receiver reports */
    int stats_started, has_last;
    uint16_t base_seq, max_seq;
    long long cycles, packets_received, jitter_q4, last_arrival, last_ts;
    /* aiortc's NackGenerator */
    int nack_started;
    uint16_t nack_max;
    uint16_t missing[MISSING_MAX];
    int nmissing;
    /* NACK history (video) */
    uint8_t *history;
    uint16_t *history_len;
    long long *history_at;
    /* counters */
    unsigned long long packets_in, forwarded, forwarded_bytes, keyframes, behind;
    int behind_pending;
};

struct DownObject {
    PyObject_HEAD
    PeerObject *peer;     /* strong */
    SourceObject *source; /* borrowed: the source holds this down while it is attached */
    SourceObject *last_source; /* borrowed identity only (never dereferenced) */
    SourceObject *pending; /* borrowed: the source whose switching list holds this down */
    uint32_t ssrc;
    uint16_t pic_offset;
    uint8_t tl0_offset;
    int last_out_pic, last_out_tl0; /* the last VP8 picture id and TL0PICIDX sent, or -1 */
    int payload_type, abs_id, level_id;
    int waiting_keyframe, started, start_seq;
    uint16_t seq_offset, last_out_seq;
    uint32_t ts_offset, last_out_ts;
    long long last_out_at;
    unsigned long long packet_count, octet_count, last_ntp, dropped, rtx_sent;
    uint32_t last_rtp_ts;
};

static PyTypeObject SourceType, DownType;
static void source_take_switching(SourceObject *src);
static int Source_clear(SourceObject *self);

static inline int
uint16_gt(uint16_t a, uint16_t b)
{
    return (a > b && a - b < 0x8000) || (a < b && b - a > 0x8000);
}

static void
call_unraisable(PyObject *fn, PyObject *args)
{
    PyObject *result;
    if (fn == Py_None || args == NULL) {
        Py_XDECREF(args);
        if (PyErr_Occurred())
            PyErr_WriteUnraisable(NULL);
        return;
    }
    result = PyObject_Call(fn, args, NULL);
    Py_DECREF(args);
    if (result == NULL)
        PyErr_WriteUnraisable(fn);
    else
        Py_DECREF(result);
}

static void
source_stats(SourceObject *src, uint16_t seq, uint32_t ts)
{
    int in_order = !src->stats_started || uint16_gt(seq, src->max_seq);
    src->packets_received++;
    if (!src->stats_started)
        src->base_seq = seq;
    if (in_order) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        long long arrival = (long long)(((double)now.tv_sec + now.tv_nsec / 1e9) *
                                        (double)src->clock_rate);
        if (src->stats_started && seq < src->max_seq)
            src->cycles += 1 << 16;
        src->max_seq = seq;
        if (src->has_last && (long long)ts != src->last_ts && src->packets_received > 1) {
            /* RFC 3550 A.8, with the timestamp difference taken modulo 2^32 (signed): across
             * a timestamp wrap the plain difference is off by 2^32 (aiortc's copy has that bug,
             * which made the reported jitter jump to ~10^8 ticks). */
            long long diff =
                (arrival - src->last_arrival) - (long long)(int32_t)(ts - (uint32_t)src->last_ts);
            if (diff < 0)
                diff = -diff;
            src->jitter_q4 += diff - ((src->jitter_q4 + 8) >> 4);
        }
        src->last_arrival = arrival;
        src->last_ts = ts;
        src->has_last = 1;
    }
    src->stats_started = 1;
}

/* aiortc's NackGenerator.add: 1 when packets went missing. */
static int
source_nack(SourceObject *src, uint16_t seq)
{
    int missed = 0;
    if (!src->nack_started) {
        src->nack_started = 1;
        src->nack_max = seq;
        return 0;
    }
    if (uint16_gt(seq, src->nack_max)) {
        uint16_t gap = (uint16_t)(seq - src->nack_max);
        uint16_t from = gap > MISSING_MAX ? (uint16_t)(seq - MISSING_MAX) : (uint16_t)(src->nack_max + 1);
        for (uint16_t s = from; s != seq; s++) {
            if (src->nmissing < MISSING_MAX)
                src->missing[src->nmissing++] = s;
            missed = 1;
        }
        src->nack_max = seq;
    } else {
        for (int i = 0; i < src->nmissing; i++)
            if (src->missing[i] == seq) {
                src->missing[i] = src->missing[--src->nmissing];
                break;
            }
    }
    /* truncate: nothing older than RTP_HISTORY_SIZE behind the newest */
    uint16_t min_seq = (uint16_t)(src->nack_max - MISSING_MAX);
    for (int i = 0; i < src->nmissing;)
        if (uint16_gt(min_seq, src->missing[i]))
            src->missing[i] = src->missing[--src->nmissing];
        else
            i++;
    return missed;
}

static int
cmp_u16(const void *a, const void *b)
{
    return (int)*(const uint16_t *)a - (int)*(const uint16_t *)b;
}

/* One subscriber's copy of a packet: rewritten, protected, queued. 1 if queued. */
static int
down_send(DownObject *down, const rtp_t *pkt, const vp8_t *vp8, int keyframe,
          unsigned long long ntp, long long now)
{
    PeerObject *peer = down->peer;
    if (!peer_routed(peer)) { /* its transport is not up (yet, or any more) */
        down->dropped++;
        return 0;
    }
    if (down->waiting_keyframe) {
        if (!keyframe) {
            down->dropped++;
            counters.dropped_waiting_keyframe++;
            return 0;
        }
        /* forwarding.py DownTrack._rebase */
        if (!down->started) {
            down->seq_offset = 0;
            down->ts_offset = 0;
            down->started = 1;
        } else {
            uint16_t next_seq = (uint16_t)(down->last_out_seq + 1);
            down->seq_offset = (uint16_t)(next_seq - pkt->seq);
            if (down->start_seq < 0) {
                double elapsed = (double)(now - down->last_out_at) / 1e9;
                if (elapsed < 0.001)
                    elapsed = 0.001;
                uint32_t gap = (uint32_t)(long long)(elapsed * down->source->clock_rate);
                uint32_t next_ts = down->last_out_ts + gap;
                down->ts_offset = next_ts - pkt->ts;
                if (vp8 != NULL) {
                    /* The picture id goes on from the last one sent (TL0PICIDX too), so the
                     * decoder sees the next picture, not a jump from another stream. */
                    int mask = vp8->long_pic ? 0x7FFF : 0x7F;
                    if (down->last_out_pic >= 0)
                        down->pic_offset = (uint16_t)((down->last_out_pic + 1 - vp8->pic) & mask);
                    if (down->last_out_tl0 >= 0)
                        down->tl0_offset = (uint8_t)((down->last_out_tl0 + 1 - vp8->tl0) & 0xFF);
                }
            }
        }
        down->start_seq = pkt->seq;
        down->waiting_keyframe = 0;
    }
    if (out_count == BATCH)
        out_flush();
    out_t *o = &out_batch[out_count];
    uint8_t *b = o->buf;
    uint16_t seq = (uint16_t)(pkt->seq + down->seq_offset);
    uint32_t ts = pkt->ts + down->ts_offset;
    size_t ext = write_extensions(b + 12, down->abs_id, down->level_id, ntp, pkt->level,
                                  pkt->voice);
    if (12 + ext + pkt->payload_len > MAX_DATAGRAM) {
        down->dropped++;
        counters.malformed++;
        return 0;
    }
    b[0] = ext ? 0x90 : 0x80;
    b[1] = (uint8_t)((pkt->marker << 7) | down->payload_type);
    wr16(b + 2, seq);
    wr32(b + 4, ts);
    wr32(b + 8, down->ssrc);
    memcpy(b + 12 + ext, pkt->payload, pkt->payload_len);
    int prev_pic = down->last_out_pic, prev_tl0 = down->last_out_tl0;
    if (vp8 != NULL) {
        /* forwarding.py DownTrack._rewrite_vp8 */
        uint8_t *d = b + 12 + ext;
        if (vp8->pic_pos >= 0) {
            int pic = (vp8->pic + down->pic_offset) & (vp8->long_pic ? 0x7FFF : 0x7F);
            down->last_out_pic = pic;
            if (vp8->long_pic) {
                d[vp8->pic_pos] = (uint8_t)(0x80 | (pic >> 8));
                d[vp8->pic_pos + 1] = (uint8_t)(pic & 0xFF);
            } else
                d[vp8->pic_pos] = (uint8_t)pic;
        }
        if (vp8->tl0_pos >= 0) {
            int tl0 = (vp8->tl0 + down->tl0_offset) & 0xFF;
            down->last_out_tl0 = tl0;
            d[vp8->tl0_pos] = (uint8_t)tl0;
        }
    }
    int len = (int)(12 + ext + pkt->payload_len);
    if (peer_protect_rtp(peer, b, &len)) {
        down->last_out_pic = prev_pic;
        down->last_out_tl0 = prev_tl0;
        down->dropped++;
        counters.send_failed++;
        return 0;
    }
    o->len = len;
    o->skip = 0;
    o->payload_len = pkt->payload_len;
    o->prev_seq = down->last_out_seq;
    o->prev_pic = prev_pic;
    o->prev_tl0 = prev_tl0;
    o->prev_ts = down->last_out_ts;
    o->prev_at = down->last_out_at;
    o->prev_rtp_ts = down->last_rtp_ts;
    o->prev_ntp = down->last_ntp;
    Py_INCREF(peer);
    o->peer = peer;
    Py_INCREF(down);
    o->down = down;
    out_count++;
    down->last_out_seq = seq;
    down->last_out_ts = ts;
    down->last_out_at = now;
    down->packet_count++;
    down->octet_count += pkt->payload_len;
    down->last_rtp_ts = ts;
    down->last_ntp = ntp;
    peer->rtp_out++;
    counters.rtp_out++;
    counters.rtp_forwarded++;
    return 1;
}

static void
source_history_put(SourceObject *src, const uint8_t *data, size_t len, uint16_t seq,
                   long long now)
{
    if (src->history == NULL || len > MAX_DATAGRAM)
        return;
    int slot = seq % HISTORY;
    memcpy(src->history + (size_t)slot * MAX_DATAGRAM, data, len);
    src->history_len[slot] = (uint16_t)len;
    src->history_at[slot] = now;
}

/* A plaintext packet of this source (from the socket, or injected by Python). */
static void
source_push(SourceObject *src, const uint8_t *data, size_t len, int count_stats)
{
    rtp_t pkt;
    if (src->closed)
        return;
    if (rtp_parse(data, len, src->level_id, &pkt) < 0) {
        counters.malformed++;
        return;
    }
    src->packets_in++;
    if (count_stats)
        source_stats(src, pkt.seq, pkt.ts);
    int missed = src->is_video ? source_nack(src, pkt.seq) : 0;
    int keyframe = keyframe_start(src->codec, pkt.payload, pkt.payload_len);
    long long now = monotonic_ns();
    if (!src->paused && pkt.payload_len > 0) {
        src->last_at = now;
        source_history_put(src, data, len, pkt.seq, now);
        if (keyframe && src->nswitching)
            source_take_switching(src);
        if (src->ndowns) {
            unsigned long long ntp = ntp_now();
            unsigned long long sent = 0;
            vp8_t vp8;
            const vp8_t *rewrite =
                src->rewrite_vp8 && vp8_parse(pkt.payload, pkt.payload_len, &vp8) ? &vp8 : NULL;
            for (Py_ssize_t i = 0; i < src->ndowns; i++)
                sent += (unsigned long long)down_send(src->downs[i], &pkt, rewrite, keyframe, ntp,
                                                      now);
            src->forwarded += sent;
            src->forwarded_bytes += sent * pkt.payload_len;
        }
    }
    /* Python hears about the rare events (after the packet is queued). */
    if (keyframe) {
        src->keyframes++;
        call_unraisable(src->on_keyframe, PyTuple_New(0));
    }
    if (pkt.level >= 0 && src->on_level != Py_None)
        call_unraisable(src->on_level, Py_BuildValue("(i)", pkt.level));
    if (missed && src->on_nack != Py_None) {
        uint16_t sorted[MISSING_MAX];
        int n = src->nmissing;
        memcpy(sorted, src->missing, sizeof(uint16_t) * (size_t)n);
        qsort(sorted, (size_t)n, sizeof(uint16_t), cmp_u16);
        PyObject *list = PyList_New(n);
        if (list != NULL) {
            for (int i = 0; i < n; i++)
                PyList_SET_ITEM(list, i, PyLong_FromLong(sorted[i]));
            call_unraisable(src->on_nack, Py_BuildValue("(N)", list));
        } else
            PyErr_WriteUnraisable(NULL);
    }
}

static void
source_detach(SourceObject *src, DownObject *down)
{
    for (Py_ssize_t i = 0; i < src->ndowns; i++)
        if (src->downs[i] == down) {
            memmove(&src->downs[i], &src->downs[i + 1],
                    sizeof(DownObject *) * (size_t)(src->ndowns - i - 1));
            src->ndowns--;
            down->source = NULL;
            Py_DECREF(down);
            return;
        }
}

static void
source_unswitch(SourceObject *src, DownObject *down)
{
    for (Py_ssize_t i = 0; i < src->nswitching; i++)
        if (src->switching[i] == down) {
            src->switching[i] = src->switching[--src->nswitching];
            down->pending = NULL;
            Py_DECREF(down);
            return;
        }
}

static void
down_fall_behind(DownObject *down)
{
    down->dropped++;
    counters.dropped_slow++;
    SourceObject *src = down->source;
    if (src != NULL && src->is_video) {
        down->waiting_keyframe = 1;
        src->behind++;
        src->behind_pending = 1;
    }
}

static int
Source_init(SourceObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"codec", "clock_rate", "video", "level_id", "on_keyframe",
                             "on_level", "on_nack", "on_behind", "rewrite_vp8", NULL};
    PyObject *on_keyframe = Py_None, *on_level = Py_None, *on_nack = Py_None,
             *on_behind = Py_None;
    int video = 0, rewrite_vp8 = 0;
    self->level_id = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii|piOOOOp", kwlist, &self->codec,
                                     &self->clock_rate, &video, &self->level_id, &on_keyframe,
                                     &on_level, &on_nack, &on_behind, &rewrite_vp8))
        return -1;
    self->rewrite_vp8 = rewrite_vp8 && self->codec == CODEC_VP8;
    if (self->clock_rate <= 0) {
        PyErr_SetString(PyExc_ValueError, "clock_rate must be positive");
        return -1;
    }
    self->is_video = video;
    Py_INCREF(on_keyframe);
    Py_XSETREF(self->on_keyframe, on_keyframe);
    Py_INCREF(on_level);
    Py_XSETREF(self->on_level, on_level);
    Py_INCREF(on_nack);
    Py_XSETREF(self->on_nack, on_nack);
    Py_INCREF(on_behind);
    Py_XSETREF(self->on_behind, on_behind);
    if (video && self->history == NULL) {
        /* One private anonymous mapping per source, not the heap: its pages are zero and
         * resident only once written, and unmapping gives them back to the system at once.
         * 1.5 MB blocks from malloc raise glibc's dynamic mmap threshold after the first
         * free, after which they come from the heap and fragment it: under churn the node's
         * memory grew though every source was freed (tests/test_churn_soak.py). */
        void *map = mmap(NULL, HISTORY_MAP, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                         -1, 0);
        if (map == MAP_FAILED) {
            PyErr_NoMemory();
            return -1;
        }
        self->history = map;
        self->history_at = (long long *)((uint8_t *)map + (size_t)HISTORY * MAX_DATAGRAM);
        self->history_len = (uint16_t *)(self->history_at + HISTORY);
    }
    return 0;
}

static void
source_clear_downs(SourceObject *self)
{
    while (self->ndowns > 0)
        source_detach(self, self->downs[self->ndowns - 1]);
    while (self->nswitching > 0)
        source_unswitch(self, self->switching[self->nswitching - 1]);
}

static void
Source_dealloc(SourceObject *self)
{
    PyObject_GC_UnTrack(self);
    source_clear_downs(self);
    PyMem_Free(self->downs);
    PyMem_Free(self->switching);
    if (self->history != NULL)
        munmap(self->history, HISTORY_MAP);
    Py_XDECREF(self->on_keyframe);
    Py_XDECREF(self->on_level);
    Py_XDECREF(self->on_nack);
    Py_XDECREF(self->on_behind);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static void
source_after_batch(SourceObject *src)
{
    if (src->behind_pending) {
        src->behind_pending = 0;
        call_unraisable(src->on_behind, PyTuple_New(0));
    }
}

/* ``down`` forwards this source from its next keyframe (video) or packet (audio). A down that
 * followed another source continues its sequence numbers, timestamps and picture ids. */
static int
source_attach(SourceObject *self, DownObject *down)
{
    if (down->pending == self)
        source_unswitch(self, down);
    if (down->source == self)
        return 0;
    if (self->ndowns == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : 8;
        DownObject **grown = PyMem_Realloc(self->downs, sizeof(DownObject *) * (size_t)cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->downs = grown;
        self->cap = cap;
    }
    if (down->source != NULL)
        source_detach(down->source, down);
    if (down->last_source != self)
        down->start_seq = -1;
    Py_INCREF(down);
    self->downs[self->ndowns++] = down;
    down->source = self;
    down->last_source = self;
    down->waiting_keyframe = self->is_video;
    return 0;
}

/* At a keyframe: every down waiting to switch here leaves its source and starts on this one,
 * with this packet (forwarding.py TrackForwarder.on_packet, DownTrack.switch_now). */
static void
source_take_switching(SourceObject *src)
{
    while (src->nswitching > 0) {
        DownObject *down = src->switching[src->nswitching - 1];
        Py_INCREF(down);
        if (source_attach(src, down) < 0) {
            PyErr_WriteUnraisable(NULL);
            source_unswitch(src, down);
        }
        Py_DECREF(down);
    }
}

/* add(down): the down forwards this source from its next keyframe (video) or packet (audio). */
static PyObject *
Source_add(SourceObject *self, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &DownType)) {
        PyErr_SetString(PyExc_TypeError, "add() takes a Down");
        return NULL;
    }
    if (source_attach(self, (DownObject *)arg) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* switch(down): the down goes on with its current source until this one's next keyframe, and
 * from that keyframe on forwards this one (leaving a switch pending elsewhere). */
static PyObject *
Source_switch(SourceObject *self, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &DownType)) {
        PyErr_SetString(PyExc_TypeError, "switch() takes a Down");
        return NULL;
    }
    DownObject *down = (DownObject *)arg;
    if (self->closed || down->pending == self || down->source == self)
        Py_RETURN_NONE;
    if (self->nswitching == self->switching_cap) {
        Py_ssize_t cap = self->switching_cap ? self->switching_cap * 2 : 4;
        DownObject **grown =
            PyMem_Realloc(self->switching, sizeof(DownObject *) * (size_t)cap);
        if (grown == NULL)
            return PyErr_NoMemory();
        self->switching = grown;
        self->switching_cap = cap;
    }
    if (down->pending != NULL)
        source_unswitch(down->pending, down);
    Py_INCREF(down);
    self->switching[self->nswitching++] = down;
    down->pending = self;
    Py_RETURN_NONE;
}

/* cancel(down): a switch to this source pending for the down is called off. */
static PyObject *
Source_cancel(SourceObject *self, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &DownType)) {
        PyErr_SetString(PyExc_TypeError, "cancel() takes a Down");
        return NULL;
    }
    if (((DownObject *)arg)->pending == self)
        source_unswitch(self, (DownObject *)arg);
    Py_RETURN_NONE;
}

static PyObject *
Source_remove(SourceObject *self, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &DownType)) {
        PyErr_SetString(PyExc_TypeError, "remove() takes a Down");
        return NULL;
    }
    if (((DownObject *)arg)->source == self)
        source_detach(self, (DownObject *)arg);
    Py_RETURN_NONE;
}

/* restart(): every down waits for the next keyframe (an unmuted video track). */
static PyObject *
Source_restart(SourceObject *self, PyObject *unused)
{
    (void)unused;
    if (self->is_video)
        for (Py_ssize_t i = 0; i < self->ndowns; i++)
            self->downs[i]->waiting_keyframe = 1;
    Py_RETURN_NONE;
}

static PyObject *
Source_close(SourceObject *self, PyObject *unused)
{
    (void)unused;
    self->closed = 1;
    /* The callbacks are bound methods of the Python objects that own this source: dropped at
     * once, not left to the cyclic GC, so that the owner and the history go now. */
    Source_clear(self);
    Py_RETURN_NONE;
}

/* inject(seq, timestamp, marker, payload, level, count_stats): a packet Python received for
 * this source (the first one, before the peer routes its SSRC here; RTX, unwrapped by aiortc). */
static PyObject *
Source_inject(SourceObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint8_t buf[MAX_DATAGRAM];
    Py_buffer payload;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "inject takes 6 arguments");
        return NULL;
    }
    unsigned long seq = PyLong_AsUnsignedLong(args[0]);
    unsigned long ts = PyLong_AsUnsignedLong(args[1]);
    long marker = PyLong_AsLong(args[2]);
    long level = PyLong_AsLong(args[4]);
    int count = PyObject_IsTrue(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[3], &payload, PyBUF_SIMPLE) < 0)
        return NULL;
    size_t pos = 12;
    if (payload.len > MAX_DATAGRAM - 20) {
        PyBuffer_Release(&payload);
        PyErr_SetString(DataplaneError, "inject: payload too large");
        return NULL;
    }
    buf[0] = 0x80;
    buf[1] = (uint8_t)((marker ? 0x80 : 0) | 0);
    wr16(buf + 2, (uint16_t)seq);
    wr32(buf + 4, (uint32_t)ts);
    wr32(buf + 8, 0);
    if (level >= 0 && self->level_id) {
        buf[0] |= 0x10;
        wr16(buf + 12, 0xBEDE);
        wr16(buf + 14, 1);
        buf[16] = (uint8_t)(self->level_id << 4);
        buf[17] = (uint8_t)(level & 0xFF);
        buf[18] = buf[19] = 0;
        pos = 20;
    }
    memcpy(buf + pos, payload.buf, (size_t)payload.len);
    size_t len = pos + (size_t)payload.len;
    PyBuffer_Release(&payload);
    Py_INCREF(self);
    source_push(self, buf, len, count);
    out_flush();
    source_after_batch(self);
    Py_DECREF(self);
    Py_RETURN_NONE;
}

/* count(seq, timestamp): a packet of this source that aiortc received itself (statistics). */
static PyObject *
Source_count(SourceObject *self, PyObject *args)
{
    unsigned int seq, ts;
    if (!PyArg_ParseTuple(args, "II", &seq, &ts))
        return NULL;
    source_stats(self, (uint16_t)seq, (uint32_t)ts);
    Py_RETURN_NONE;
}

static PyObject *
Source_stats(SourceObject *self, PyObject *unused)
{
    (void)unused;
    if (!self->stats_started)
        Py_RETURN_NONE;
    return Py_BuildValue("(iiLLL)", self->base_seq, self->max_seq, self->cycles,
                         self->packets_received, self->jitter_q4);
}

static PyObject *
Source_get_paused(SourceObject *self, void *c)
{
    (void)c;
    return PyBool_FromLong(self->paused);
}

static int
Source_set_paused(SourceObject *self, PyObject *value, void *c)
{
    (void)c;
    int v = value ? PyObject_IsTrue(value) : 0;
    if (v < 0)
        return -1;
    self->paused = v;
    return 0;
}

static PyObject *
Source_get_ndowns(SourceObject *self, void *c)
{
    (void)c;
    return PyLong_FromSsize_t(self->ndowns);
}

static PyMethodDef Source_methods[] = {
    {"add", (PyCFunction)Source_add, METH_O, NULL},
    {"switch", (PyCFunction)Source_switch, METH_O, NULL},
    {"cancel", (PyCFunction)Source_cancel, METH_O, NULL},
    {"remove", (PyCFunction)Source_remove, METH_O, NULL},
    {"restart", (PyCFunction)Source_restart, METH_NOARGS, NULL},
    {"close", (PyCFunction)Source_close, METH_NOARGS, NULL},
    {"inject", (PyCFunction)(void (*)(void))Source_inject, METH_FASTCALL, NULL},
    {"stats", (PyCFunction)Source_stats, METH_NOARGS, NULL},
    {"count", (PyCFunction)Source_count, METH_VARARGS, NULL},
    {NULL}};

static PyMemberDef Source_members[] = {
    {"packets_in", T_ULONGLONG, offsetof(SourceObject, packets_in), READONLY, NULL},
    {"forwarded", T_ULONGLONG, offsetof(SourceObject, forwarded), READONLY, NULL},
    {"forwarded_bytes", T_ULONGLONG, offsetof(SourceObject, forwarded_bytes), READONLY, NULL},
    {"keyframes", T_ULONGLONG, offsetof(SourceObject, keyframes), READONLY, NULL},
    {"behind", T_ULONGLONG, offsetof(SourceObject, behind), READONLY, NULL},
    {"last_at_ns", T_LONGLONG, offsetof(SourceObject, last_at), READONLY, NULL},
    {NULL}};

static PyGetSetDef Source_getset[] = {
    {"paused", (getter)Source_get_paused, (setter)Source_set_paused, NULL, NULL},
    {"downs", (getter)Source_get_ndowns, NULL, NULL, NULL},
    {NULL}};

/* The cyclic GC: a source's callbacks are bound methods of the objects that own it, so a
 * source that is never closed is still collected with its owner. Clearing detaches the downs
 * and drops the callbacks; the object stays usable (as after close). */
static int
Source_traverse(SourceObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_keyframe);
    Py_VISIT(self->on_level);
    Py_VISIT(self->on_nack);
    Py_VISIT(self->on_behind);
    for (Py_ssize_t i = 0; i < self->ndowns; i++)
        Py_VISIT(self->downs[i]);
    for (Py_ssize_t i = 0; i < self->nswitching; i++)
        Py_VISIT(self->switching[i]);
    return 0;
}

static int
Source_clear(SourceObject *self)
{
    source_clear_downs(self);
    Py_XSETREF(self->on_keyframe, Py_NewRef(Py_None));
    Py_XSETREF(self->on_level, Py_NewRef(Py_None));
    Py_XSETREF(self->on_nack, Py_NewRef(Py_None));
    Py_XSETREF(self->on_behind, Py_NewRef(Py_None));
    return 0;
}

static PyTypeObject SourceType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "spaces.media._dataplane.Source",
    .tp_basicsize = sizeof(SourceObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Source_traverse,
    .tp_clear = (inquiry)Source_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Source_init,
    .tp_dealloc = (destructor)Source_dealloc,
    .tp_methods = Source_methods,
    .tp_members = Source_members,
    .tp_getset = Source_getset,
};

static int
Down_init(DownObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"peer", "ssrc", "payload_type", "abs_send_time_id",
                             "audio_level_id", NULL};
    PyObject *peer;
    unsigned long ssrc;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!kiii", kwlist, &PeerType, &peer, &ssrc,
                                     &self->payload_type, &self->abs_id, &self->level_id))
        return -1;
    if (self->payload_type < 0 || self->payload_type > 127 || self->abs_id < 0 ||
        self->abs_id > 14 || self->level_id < 0 || self->level_id > 14) {
        PyErr_SetString(PyExc_ValueError, "payload type or extension id out of range");
        return -1;
    }
    Py_INCREF(peer);
    Py_XSETREF(self->peer, (PeerObject *)peer);
    self->ssrc = (uint32_t)ssrc;
    self->start_seq = -1;
    self->waiting_keyframe = 1;
    self->last_out_pic = -1;
    self->last_out_tl0 = -1;
    return 0;
}

static void
Down_dealloc(DownObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_XDECREF(self->peer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* retransmit(out_seq) -> bool: answer a subscriber's NACK from the source's history. */
static PyObject *
Down_retransmit(DownObject *self, PyObject *arg)
{
    long out_seq = PyLong_AsLong(arg);
    rtp_t pkt;
    if (out_seq == -1 && PyErr_Occurred())
        return NULL;
    SourceObject *src = self->source;
    if (src == NULL || src->history == NULL || self->waiting_keyframe)
        Py_RETURN_FALSE;
    uint16_t in_seq = (uint16_t)((uint16_t)out_seq - self->seq_offset);
    if (self->start_seq >= 0 && (uint16_t)(in_seq - (uint16_t)self->start_seq) >= 0x8000)
        Py_RETURN_FALSE;
    int slot = in_seq % HISTORY;
    size_t len = src->history_len[slot];
    const uint8_t *data = src->history + (size_t)slot * MAX_DATAGRAM;
    long long now = monotonic_ns();
    if (len == 0 || now - src->history_at[slot] > RTX_MAX_AGE_NS ||
        rtp_parse(data, len, src->level_id, &pkt) < 0 || pkt.seq != in_seq)
        Py_RETURN_FALSE;
    /* Sent at once, as its own datagram, keeping the down's continuity state untouched. */
    uint16_t keep_seq = self->last_out_seq;
    int keep_pic = self->last_out_pic, keep_tl0 = self->last_out_tl0;
    uint32_t keep_ts = self->last_out_ts;
    long long keep_at = self->last_out_at;
    unsigned long long keep_count = self->packet_count, keep_octets = self->octet_count;
    out_flush();
    vp8_t vp8;
    const vp8_t *rewrite =
        src->rewrite_vp8 && vp8_parse(pkt.payload, pkt.payload_len, &vp8) ? &vp8 : NULL;
    down_send(self, &pkt, rewrite, 0, ntp_now(), now);
    self->last_out_seq = keep_seq;
    self->last_out_pic = keep_pic;
    self->last_out_tl0 = keep_tl0;
    self->last_out_ts = keep_ts;
    self->last_out_at = keep_at;
    self->packet_count = keep_count + 1;
    self->octet_count = keep_octets + pkt.payload_len;
    counters.rtp_forwarded--;
    counters.rtx_sent++;
    self->rtx_sent++;
    out_flush();
    Py_RETURN_TRUE;
}

static PyObject *
Down_get_source(DownObject *self, void *c)
{
    (void)c;
    if (self->source == NULL)
        Py_RETURN_NONE;
    Py_INCREF(self->source);
    return (PyObject *)self->source;
}

static PyObject *
Down_get_waiting(DownObject *self, void *c)
{
    (void)c;
    return PyBool_FromLong(self->waiting_keyframe);
}

static int
Down_set_waiting(DownObject *self, PyObject *value, void *c)
{
    (void)c;
    int v = value ? PyObject_IsTrue(value) : 0;
    if (v < 0)
        return -1;
    self->waiting_keyframe = v;
    return 0;
}

static PyObject *
Down_get_connected(DownObject *self, void *c)
{
    (void)c;
    return PyBool_FromLong(peer_routed(self->peer));
}

static PyMethodDef Down_methods[] = {
    {"retransmit", (PyCFunction)Down_retransmit, METH_O, NULL},
    {NULL}};

static PyMemberDef Down_members[] = {
    {"packet_count", T_ULONGLONG, offsetof(DownObject, packet_count), READONLY, NULL},
    {"octet_count", T_ULONGLONG, offsetof(DownObject, octet_count), READONLY, NULL},
    {"last_ntp", T_ULONGLONG, offsetof(DownObject, last_ntp), READONLY, NULL},
    {"last_rtp_timestamp", T_UINT, offsetof(DownObject, last_rtp_ts), READONLY, NULL},
    {"dropped", T_ULONGLONG, offsetof(DownObject, dropped), READONLY, NULL},
    {"rtx_sent", T_ULONGLONG, offsetof(DownObject, rtx_sent), READONLY, NULL},
    {"ssrc", T_UINT, offsetof(DownObject, ssrc), READONLY, NULL},
    {NULL}};

static PyObject *
Down_get_pending(DownObject *self, void *c)
{
    (void)c;
    if (self->pending == NULL)
        Py_RETURN_NONE;
    return Py_NewRef((PyObject *)self->pending);
}

static PyGetSetDef Down_getset[] = {
    {"source", (getter)Down_get_source, NULL, NULL, NULL},
    {"pending", (getter)Down_get_pending, NULL, NULL, NULL},
    {"waiting_keyframe", (getter)Down_get_waiting, (setter)Down_set_waiting, NULL, NULL},
    {"connected", (getter)Down_get_connected, NULL, NULL, NULL},
    {NULL}};

/* A down holds its peer; the peer's sources (which hold the downs) are cleared by the peer's and
 * the source's tp_clear, so the down needs no tp_clear of its own (its peer stays valid). */
static int
Down_traverse(DownObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->peer);
    return 0;
}

static PyTypeObject DownType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "spaces.media._dataplane.Down",
    .tp_basicsize = sizeof(DownObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Down_traverse,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Down_init,
    .tp_dealloc = (destructor)Down_dealloc,
    .tp_methods = Down_methods,
    .tp_members = Down_members,
    .tp_getset = Down_getset,
};

/* ``o`` was queued but will not be sent: its down's counts and continuity go back to what
 * they were before it. */
static void
out_unsend(out_t *o)
{
    DownObject *down = o->down;
    down->last_out_seq = o->prev_seq;
    down->last_out_pic = o->prev_pic;
    down->last_out_tl0 = o->prev_tl0;
    down->last_out_ts = o->prev_ts;
    down->last_out_at = o->prev_at;
    down->last_rtp_ts = o->prev_rtp_ts;
    down->last_ntp = o->prev_ntp;
    if (down->packet_count)
        down->packet_count--;
    if (down->octet_count >= o->payload_len)
        down->octet_count -= o->payload_len;
    if (o->peer->rtp_out)
        o->peer->rtp_out--;
    if (counters.rtp_out)
        counters.rtp_out--;
    if (counters.rtp_forwarded)
        counters.rtp_forwarded--;
    SourceObject *src = down->source;
    if (src != NULL) {
        if (src->forwarded)
            src->forwarded--;
        if (src->forwarded_bytes >= o->payload_len)
            src->forwarded_bytes -= o->payload_len;
    }
}

static void
out_flush(void)
{
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    int i = 0;
    SourceObject *behind[BATCH];
    int nbehind = 0;
    if (out_count == 0)
        return;
    memset(msgs, 0, sizeof(msgs));
    for (int k = 0; k < out_count; k++) {
        iov[k].iov_base = out_batch[k].buf;
        iov[k].iov_len = (size_t)out_batch[k].len;
        msgs[k].msg_hdr.msg_iov = &iov[k];
        msgs[k].msg_hdr.msg_iovlen = 1;
        msgs[k].msg_hdr.msg_name = &out_batch[k].peer->addr.ss;
        msgs[k].msg_hdr.msg_namelen = out_batch[k].peer->addr.len;
    }
    while (i < out_count) {
        int fd = out_batch[i].peer->fd, j = i;
        if (fd < 0 && out_batch[i].peer->sender != NULL) {
            /* no socket of its own: Python sends it (a TURN-relayed pair) */
            PeerObject *peer = out_batch[i].peer;
            call_unraisable(peer->sender,
                            Py_BuildValue("(y#)", out_batch[i].buf, (Py_ssize_t)out_batch[i].len));
            counters.datagrams_out++;
            counters.bytes_out += (unsigned long long)out_batch[i].len;
            i++;
            continue;
        }
        while (j < out_count && out_batch[j].peer->fd == fd)
            j++;
        int done = 0;
        while (i + done < j) {
            int start = i + done, end = start;
            if (out_batch[start].skip) {
                done++;
                continue;
            }
            while (end < j && !out_batch[end].skip)
                end++;
            int sent = fd < 0 ? -1 : sendmmsg(fd, msgs + start, (unsigned)(end - start), 0);
            if (sent > 0) {
                for (int k = i + done; k < i + done + sent; k++) {
                    counters.datagrams_out++;
                    counters.bytes_out += (unsigned long long)out_batch[k].len;
                    out_batch[k].peer->bytes_out += (unsigned long long)out_batch[k].len;
                }
                done += sent;
                continue;
            }
            int err = fd < 0 ? EBADF : errno;
            if (err == EINTR)
                continue;
            /* This datagram cannot go: a full socket buffer means a slow subscriber (it
             * waits for a keyframe, and what it was to get after this in the batch is not
             * sent either: no gap in its sequence), anything else is a failed send. The
             * others still go. */
            DownObject *down = out_batch[start].down;
            if (err == EAGAIN || err == EWOULDBLOCK) {
                counters.send_would_block++;
                /* latest first: the down ends as it was before this datagram */
                for (int k = out_count - 1; k > start; k--)
                    if (out_batch[k].down == down && !out_batch[k].skip) {
                        out_batch[k].skip = 1;
                        out_unsend(&out_batch[k]);
                        down->dropped++;
                        counters.dropped_slow++;
                    }
                out_unsend(&out_batch[start]);
                if (down->source && !down->waiting_keyframe) {
                    down_fall_behind(down);
                    if (nbehind < BATCH) {
                        Py_INCREF(down->source);
                        behind[nbehind++] = down->source;
                    }
                }
            } else {
                counters.send_failed++;
                down->dropped++;
            }
            done++;
        }
        i = j;
    }
    for (int k = 0; k < out_count; k++)
        out_queue_done(&out_batch[k]);
    out_count = 0;
    for (int k = 0; k < nbehind; k++) {
        source_after_batch(behind[k]);
        Py_DECREF(behind[k]);
    }
}

/* --- the peer's sources ------------------------------------------------------------------ */

static SourceObject *
peer_source(PeerObject *self, uint32_t ssrc)
{
    for (Py_ssize_t i = 0; i < self->nsources; i++)
        if (self->sources[i].ssrc == ssrc)
            return self->sources[i].source;
    return NULL;
}

static void
peer_clear_sources(PeerObject *self)
{
    for (Py_ssize_t i = 0; i < self->nsources; i++)
        Py_CLEAR(self->sources[i].source);
    PyMem_Free(self->sources);
    self->sources = NULL;
    self->nsources = 0;
}

static PyObject *
Peer_add_source(PeerObject *self, PyObject *args)
{
    unsigned long ssrc;
    PyObject *source;
    if (!PyArg_ParseTuple(args, "kO!", &ssrc, &SourceType, &source))
        return NULL;
    for (Py_ssize_t i = 0; i < self->nsources; i++)
        if (self->sources[i].ssrc == (uint32_t)ssrc) {
            Py_INCREF(source);
            Py_XSETREF(self->sources[i].source, (SourceObject *)source);
            Py_RETURN_NONE;
        }
    source_slot_t *grown =
        PyMem_Realloc(self->sources, sizeof(source_slot_t) * (size_t)(self->nsources + 1));
    if (grown == NULL)
        return PyErr_NoMemory();
    self->sources = grown;
    Py_INCREF(source);
    self->sources[self->nsources].ssrc = (uint32_t)ssrc;
    self->sources[self->nsources].source = (SourceObject *)source;
    self->nsources++;
    Py_RETURN_NONE;
}

static PyObject *
Peer_remove_source(PeerObject *self, PyObject *arg)
{
    unsigned long ssrc = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    for (Py_ssize_t i = 0; i < self->nsources; i++)
        if (self->sources[i].ssrc == (uint32_t)ssrc) {
            SourceObject *gone = self->sources[i].source;
            self->sources[i] = self->sources[--self->nsources];
            Py_DECREF(gone);
            break;
        }
    Py_RETURN_NONE;
}

static PyObject *
Peer_close(PeerObject *self, PyObject *unused)
{
    (void)unused;
    Peer_clear(self); /* as in Source.close */
    self->fd = -1;
    Py_RETURN_NONE;
}

/* --- Socket: recvmmsg, demultiplexing, fallback --------------------------------------------- */

typedef struct {
    addr_t addr;
    PeerObject *peer; /* strong */
} peer_slot_t;

typedef struct {
    PyObject_HEAD
    int fd, closed;
    PyObject *fallback;
    peer_slot_t *peers;
    Py_ssize_t npeers;
    unsigned long long datagrams_in, rtp_in, rtcp_in, fallback_in, unprotect_failed;
} SocketObject;

static PyTypeObject SocketType;
static int Socket_clear(SocketObject *self);

static int
Socket_init(SocketObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "fallback", NULL};
    PyObject *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO", kwlist, &self->fd, &fallback))
        return -1;
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return -1;
    }
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    return 0;
}

static void
socket_clear(SocketObject *self)
{
    for (Py_ssize_t i = 0; i < self->npeers; i++)
        Py_CLEAR(self->peers[i].peer);
    PyMem_Free(self->peers);
    self->peers = NULL;
    self->npeers = 0;
}

static void
Socket_dealloc(SocketObject *self)
{
    PyObject_GC_UnTrack(self);
    socket_clear(self);
    Py_XDECREF(self->fallback);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PeerObject *
socket_peer(SocketObject *self, const struct sockaddr_storage *ss)
{
    for (Py_ssize_t i = 0; i < self->npeers; i++)
        if (addr_equal(&self->peers[i].addr.ss, ss))
            return self->peers[i].peer;
    return NULL;
}

static void
socket_datagram(SocketObject *self, uint8_t *buf, int len, const struct sockaddr_storage *ss)
{
    PeerObject *peer = NULL;
    counters.datagrams_in++;
    self->datagrams_in++;
    if (len > 0 && buf[0] >= 128 && buf[0] <= 191)
        peer = socket_peer(self, ss);
    if (peer != NULL && peer->keyed) {
        Py_INCREF(peer);
        if (is_rtcp(buf, (size_t)len)) {
            counters.rtcp_in++;
            self->rtcp_in++;
            peer->rtcp_in++;
            if (srtp_unprotect_rtcp(peer->rx, buf, &len) == srtp_err_status_ok)
                call_unraisable(peer->on_rtcp, Py_BuildValue("(y#)", buf, (Py_ssize_t)len));
            else {
                counters.unprotect_failed++;
                self->unprotect_failed++;
            }
        } else {
            counters.rtp_in++;
            self->rtp_in++;
            peer->rtp_in++;
            if (peer_unprotect_rtp(peer, buf, &len) == 0) {
                SourceObject *src = len >= 12 ? peer_source(peer, rd32(buf + 8)) : NULL;
                if (src != NULL) {
                    Py_INCREF(src);
                    source_push(src, buf, (size_t)len, 1);
                    source_after_batch(src);
                    Py_DECREF(src);
                } else if (peer->on_rtp != Py_None) {
                    struct timespec ts;
                    clock_gettime(CLOCK_MONOTONIC, &ts);
                    long long ms = (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
                    call_unraisable(peer->on_rtp,
                                    Py_BuildValue("(y#L)", buf, (Py_ssize_t)len, ms));
                }
            } else {
                counters.unprotect_failed++;
                self->unprotect_failed++;
            }
        }
        Py_DECREF(peer);
        return;
    }
    counters.fallback_in++;
    self->fallback_in++;
    PyObject *addr = addr_to_tuple(ss);
    if (addr == NULL) {
        PyErr_WriteUnraisable(NULL);
        return;
    }
    call_unraisable(self->fallback, Py_BuildValue("(y#N)", buf, (Py_ssize_t)len, addr));
}

static uint8_t in_bufs[BATCH][MAX_DATAGRAM + 64];

/* read() -> int: every datagram waiting on the socket (a few batches at most). */
static PyObject *
Socket_read(SocketObject *self, PyObject *unused)
{
    (void)unused;
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_storage addrs[BATCH];
    long total = 0;
    if (self->closed)
        return PyLong_FromLong(0);
    Py_INCREF(self);
    for (int round = 0; round < MAX_READ_BATCHES && !self->closed; round++) {
        memset(msgs, 0, sizeof(msgs));
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = in_bufs[i];
            iov[i].iov_len = MAX_DATAGRAM + 64;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof(addrs[i]);
        }
        int n = recvmmsg(self->fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0)
            break;
        for (int i = 0; i < n && !self->closed; i++) {
            int len = (int)msgs[i].msg_len;
            if (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) {
                counters.malformed++;
                continue;
            }
            socket_datagram(self, in_bufs[i], len, &addrs[i]);
        }
        total += n;
        out_flush();
        if (n < BATCH)
            break;
    }
    out_flush();
    Py_DECREF(self);
    return PyLong_FromLong(total);
}

static PyObject *
Socket_add_peer(SocketObject *self, PyObject *args)
{
    PyObject *addr, *peer;
    addr_t parsed;
    if (!PyArg_ParseTuple(args, "OO!", &addr, &PeerType, &peer))
        return NULL;
    if (addr_from_tuple(addr, &parsed) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < self->npeers; i++)
        if (addr_equal(&self->peers[i].addr.ss, &parsed.ss)) {
            Py_INCREF(peer);
            Py_XSETREF(self->peers[i].peer, (PeerObject *)peer);
            Py_RETURN_NONE;
        }
    peer_slot_t *grown =
        PyMem_Realloc(self->peers, sizeof(peer_slot_t) * (size_t)(self->npeers + 1));
    if (grown == NULL)
        return PyErr_NoMemory();
    self->peers = grown;
    Py_INCREF(peer);
    self->peers[self->npeers].addr = parsed;
    self->peers[self->npeers].peer = (PeerObject *)peer;
    self->npeers++;
    Py_RETURN_NONE;
}

static PyObject *
Socket_remove_peer(SocketObject *self, PyObject *arg)
{
    for (Py_ssize_t i = 0; i < self->npeers;) {
        if ((PyObject *)self->peers[i].peer == arg) {
            PeerObject *gone = self->peers[i].peer;
            self->peers[i] = self->peers[--self->npeers];
            Py_DECREF(gone);
        } else
            i++;
    }
    Py_RETURN_NONE;
}

static PyObject *
Socket_update_peer_addr(SocketObject *self, PyObject *args)
{
    PyObject *peer, *addr;
    addr_t parsed;
    if (!PyArg_ParseTuple(args, "O!O", &PeerType, &peer, &addr))
        return NULL;
    if (addr_from_tuple(addr, &parsed) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < self->npeers; i++)
        if ((PyObject *)self->peers[i].peer == peer) {
            self->peers[i].addr = parsed;
            Py_RETURN_NONE;
        }
    PyErr_SetString(PyExc_KeyError, "the peer is not on this socket");
    return NULL;
}

static PyObject *
Socket_close(SocketObject *self, PyObject *unused)
{
    (void)unused;
    self->closed = 1;
    Socket_clear(self);
    Py_RETURN_NONE;
}

static PyObject *
Socket_get_peers(SocketObject *self, void *c)
{
    (void)c;
    return PyLong_FromSsize_t(self->npeers);
}

static PyMethodDef Socket_methods[] = {
    {"read", (PyCFunction)Socket_read, METH_NOARGS, NULL},
    {"add_peer", (PyCFunction)Socket_add_peer, METH_VARARGS, NULL},
    {"remove_peer", (PyCFunction)Socket_remove_peer, METH_O, NULL},
    {"update_peer_addr", (PyCFunction)Socket_update_peer_addr, METH_VARARGS, NULL},
    {"close", (PyCFunction)Socket_close, METH_NOARGS, NULL},
    {NULL}};

static PyMemberDef Socket_members[] = {
    {"fd", T_INT, offsetof(SocketObject, fd), READONLY, NULL},
    {"datagrams_in", T_ULONGLONG, offsetof(SocketObject, datagrams_in), READONLY, NULL},
    {"rtp_in", T_ULONGLONG, offsetof(SocketObject, rtp_in), READONLY, NULL},
    {"rtcp_in", T_ULONGLONG, offsetof(SocketObject, rtcp_in), READONLY, NULL},
    {"fallback_in", T_ULONGLONG, offsetof(SocketObject, fallback_in), READONLY, NULL},
    {"unprotect_failed", T_ULONGLONG, offsetof(SocketObject, unprotect_failed), READONLY, NULL},
    {NULL}};

static PyGetSetDef Socket_getset[] = {{"peers", (getter)Socket_get_peers, NULL, NULL, NULL},
                                      {NULL}};

static int
Socket_traverse(SocketObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    for (Py_ssize_t i = 0; i < self->npeers; i++)
        Py_VISIT(self->peers[i].peer);
    return 0;
}

static int
Socket_clear(SocketObject *self)
{
    socket_clear(self);
    Py_XSETREF(self->fallback, Py_NewRef(Py_None));
    return 0;
}

static PyTypeObject SocketType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "spaces.media._dataplane.Socket",
    .tp_basicsize = sizeof(SocketObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Socket_traverse,
    .tp_clear = (inquiry)Socket_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Socket_init,
    .tp_dealloc = (destructor)Socket_dealloc,
    .tp_methods = Socket_methods,
    .tp_members = Socket_members,
    .tp_getset = Socket_getset,
};

static PyMethodDef Peer_methods[] = {
    {"protect", (PyCFunction)Peer_protect, METH_O, "SRTP-protect an RTP packet."},
    {"protect_rtcp", (PyCFunction)Peer_protect_rtcp, METH_O, "SRTCP-protect an RTCP packet."},
    {"unprotect", (PyCFunction)Peer_unprotect, METH_O, "SRTP-unprotect."},
    {"unprotect_rtcp", (PyCFunction)Peer_unprotect_rtcp, METH_O, "SRTCP-unprotect."},
    {"set_route", (PyCFunction)Peer_set_route, METH_VARARGS, "set_route(fd, (host, port))"},
    {"set_keys", (PyCFunction)Peer_set_keys, METH_VARARGS, "set_keys(profile, rx, tx)"},
    {"set_handlers", (PyCFunction)Peer_set_handlers, METH_VARARGS,
     "set_handlers(on_rtp, on_rtcp)"},
    {"add_source", (PyCFunction)Peer_add_source, METH_VARARGS, "add_source(ssrc, source)"},
    {"remove_source", (PyCFunction)Peer_remove_source, METH_O, "remove_source(ssrc)"},
    {"close", (PyCFunction)Peer_close, METH_NOARGS, "Forget sources and route."},
    {"set_sender", (PyCFunction)Peer_set_sender, METH_O, "set_sender(callable | None)"},
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

static int
Peer_traverse(PeerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_rtcp);
    Py_VISIT(self->on_rtp);
    Py_VISIT(self->sender);
    for (Py_ssize_t i = 0; i < self->nsources; i++)
        Py_VISIT(self->sources[i].source);
    return 0;
}

static int
Peer_clear(PeerObject *self)
{
    peer_clear_sources(self);
    Py_CLEAR(self->sender);
    Py_XSETREF(self->on_rtp, Py_NewRef(Py_None));
    Py_XSETREF(self->on_rtcp, Py_NewRef(Py_None));
    return 0;
}

static PyTypeObject PeerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "spaces.media._dataplane.Peer",
    .tp_basicsize = sizeof(PeerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Peer_traverse,
    .tp_clear = (inquiry)Peer_clear,
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
    if (PyType_Ready(&PeerType) < 0 || PyType_Ready(&SourceType) < 0 ||
        PyType_Ready(&DownType) < 0 || PyType_Ready(&SocketType) < 0)
        return NULL;
    m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(DataplaneError);
    PyModule_AddObject(m, "Error", DataplaneError);
    Py_INCREF(&PeerType);
    PyModule_AddObject(m, "Peer", (PyObject *)&PeerType);
    Py_INCREF(&SourceType);
    PyModule_AddObject(m, "Source", (PyObject *)&SourceType);
    Py_INCREF(&DownType);
    PyModule_AddObject(m, "Down", (PyObject *)&DownType);
    Py_INCREF(&SocketType);
    PyModule_AddObject(m, "Socket", (PyObject *)&SocketType);
    PyModule_AddIntConstant(m, "CODEC_OTHER", CODEC_OTHER);
    PyModule_AddIntConstant(m, "CODEC_VP8", CODEC_VP8);
    PyModule_AddIntConstant(m, "CODEC_H264", CODEC_H264);
    PyModule_AddIntConstant(m, "PROFILE_AES128_CM_SHA1_80", srtp_profile_aes128_cm_sha1_80);
    PyModule_AddIntConstant(m, "BATCH", BATCH);
    PyModule_AddIntConstant(m, "HISTORY", HISTORY);
    return m;
}
