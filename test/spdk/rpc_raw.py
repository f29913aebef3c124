"""Sends one JSON-RPC request to an SPDK application and prints the answer.

usage: rpc_raw.py SOCKET METHOD [PARAMS_TEXT] [TIMEOUT_S]

PARAMS_TEXT is inserted into the request verbatim, so malformed parameters (duplicate
keys, wrong types) reach the server exactly as written. Prints the result as JSON on
stdout, or the error object on stderr. Exit status: 0 result, 1 JSON-RPC error,
2 no answer (connection refused, closed or timed out).
"""

import json
import socket
import sys


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    sock, method = sys.argv[1], sys.argv[2]
    params = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != '' else None
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0
    req = '{"jsonrpc": "2.0", "id": 1, "method": %s' % json.dumps(method)
    if params is not None:
        req += ', "params": ' + params
    req += '}'
    resp = None
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall(req.encode())
        buf = b''
        while resp is None:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
            try:
                resp, _ = json.JSONDecoder().raw_decode(buf.decode())
            except ValueError:
                continue
    except OSError as e:
        print('no answer: %s' % e, file=sys.stderr)
        return 2
    if resp is None:
        print('no answer: connection closed', file=sys.stderr)
        return 2
    if 'error' in resp:
        print(json.dumps(resp['error']), file=sys.stderr)
        return 1
    print(json.dumps(resp.get('result'), indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
