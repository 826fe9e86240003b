# Writes the hand-made key_extract seeds into the directory given (fuzz/seeds/key_extract): each
# is arbitrary 1.x's encoding of the target's `Input`, checked with
#   RUST_LIBFUZZER_DEBUG_PATH=/dev/stdout target/*/release/key_extract -runs=1 SEED
import sys
class Enc:
    def __init__(s): s.front = bytearray(); s.back = []
    def u8(s, b): s.front.append(b)
    def bool(s, x): s.u8(1 if x else 0)
    def tag(s, i, n): s.front += (((2 * i + 1) << 32) // (2 * n)).to_bytes(4, 'little')
    def bytes_(s, b): s.back.append(len(b)); s.front += b
    def str_(s, x): s.bytes_(x.encode())
    def vec(s, items, f):
        for it in items: s.bool(True); f(it)
        s.bool(False)
    def opt(s, x, f):
        s.bool(x is not None)
        if x is not None: f(x)
    def done(s):
        out = bytes(s.front) + bytes(reversed(s.back))
        assert len(out) <= 256, len(out)
        return out

NAMES = ['IdempotencyKey', 'XIdempotentKey', 'ContentType']
def enc_input(headers=(), query=None, raw_query=None, ct=('None',), body=('Raw', b'')):
    e = Enc()
    def header(h):
        name, value = h
        if name in NAMES: e.tag(NAMES.index(name), 4)
        else: e.tag(3, 4); e.str_(name)
        e.bytes_(value)
    e.vec(headers, header)
    def pair(p):
        e.opt(p[0], e.str_); e.str_(p[1])
    e.opt(query, lambda q: e.vec(q, pair))
    e.opt(raw_query, e.str_)
    kind = ct[0]
    if kind == 'None': e.tag(0, 4)
    elif kind == 'UrlEncoded': e.tag(1, 4)
    elif kind == 'Multipart': e.tag(2, 4); e.str_(ct[1])
    else: e.tag(3, 4); e.str_(ct[1])
    kind = body[0]
    if kind == 'Raw': e.tag(0, 3); e.front += body[1]
    elif kind == 'Form': e.tag(1, 3); e.vec(body[1], pair)
    else:
        e.tag(2, 3)
        def part(p):
            name, file_name, content_type, data = p
            e.opt(name, e.str_); e.opt(file_name, e.str_); e.opt(content_type, e.str_); e.bytes_(data)
        e.vec(body[1], part)
        e.bool(body[2])
    return e.done()

K = None  # the key field / parameter
seeds = {
    'sf-header': enc_input(headers=[('IdempotencyKey', b'"order-1"')]),
    'bare-header-params': enc_input(headers=[('IdempotencyKey', b'order-1;p=1')]),
    'x-header': enc_input(headers=[('XIdempotentKey', b'order-2')]),
    'query-pairs': enc_input(query=[('item', 'book'), (K, 'q-1')]),
    'raw-query': enc_input(raw_query='a=1&__idempotent_key=q-2&b'),
    'urlencoded-form': enc_input(ct=('UrlEncoded',), body=('Form', [('item', 'book'), (K, 'f-1')])),
    'urlencoded-raw': enc_input(ct=('UrlEncoded',), body=('Raw', b'item=lamp&__idempotent_key=f-2')),
    'content-type-header': enc_input(headers=[('ContentType', b'application/x-www-form-urlencoded; charset=utf-8')], body=('Raw', b'__idempotent_key=f-3')),
    'multipart': enc_input(ct=('Multipart', 'XyZ'), body=('Multipart', [('item', None, None, b'book'), (K, None, None, b'm-1')], True)),
    'multipart-file': enc_input(ct=('Multipart', 'b0undary'), body=('Multipart', [('upload', 'a.txt', 'text/plain', b'hello\r\n'), (K, None, None, b'm-2')], True)),
    'multipart-unclosed': enc_input(ct=('Multipart', 'Q'), body=('Multipart', [(K, None, None, b'm-3')], False)),
    'all-sources-agree': enc_input(headers=[('IdempotencyKey', b'"k"'), ('XIdempotentKey', b'k')], query=[(K, 'k')], ct=('UrlEncoded',), body=('Form', [(K, 'k')])),
    'sources-conflict': enc_input(headers=[('IdempotencyKey', b'a')], query=[(K, 'b')]),
    'repeated-header': enc_input(headers=[('IdempotencyKey', b'"a"'), ('IdempotencyKey', b'"a"')]),
    'other-header': enc_input(headers=[('authorization', b'Bearer t'), ('x-idempotent-key', b'o-1')]),
}
for name, data in seeds.items():
    open(f'{sys.argv[1]}/seed-{name}', 'wb').write(data)
