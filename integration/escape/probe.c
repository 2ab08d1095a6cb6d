/* What an action could try that busybox has no applet for (integration/escape).
 * Built static by the trials with gcc; every command prints one line.
 *
 *   probe raw                      raw IPv4 and packet sockets: "raw ok|ERRNO packet ok|ERRNO"
 *   probe ping ADDR                ICMP echo over a ping socket: "ping ADDR reached|blocked|ERRNO"
 *   probe ptrace PID               "ptrace ok|ERRNO"
 *   probe garp IFACE ADDR N        N gratuitous ARP replies claiming ADDR: "garp sent N"
 *   probe sniff IFACE ADDR SECS    IPv4 frames to ADDR seen on IFACE: "sniffed N"
 */
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip_icmp.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *err(void) {
    switch (errno) {
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ENETUNREACH: return "ENETUNREACH";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    default: return strerror(errno);
    }
}

static int raw(void) {
    int s = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
    printf("raw %s", s >= 0 ? "ok" : err());
    int p = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    printf(" packet %s\n", p >= 0 ? "ok" : err());
    return 0;
}

static int ping(const char *addr) {
    struct sockaddr_in to = {.sin_family = AF_INET};
    if (inet_pton(AF_INET, addr, &to.sin_addr) != 1) return 2;
    int s = socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP);
    if (s < 0) { printf("ping %s %s\n", addr, err()); return 0; }
    struct icmphdr h = {.type = ICMP_ECHO};
    h.un.echo.sequence = htons(1);
    if (sendto(s, &h, sizeof h, 0, (struct sockaddr *)&to, sizeof to) < 0) {
        printf("ping %s blocked\n", addr);
        return 0;
    }
    struct pollfd pfd = {.fd = s, .events = POLLIN};
    char buf[256];
    if (poll(&pfd, 1, 2000) == 1 && recv(s, buf, sizeof buf, 0) > 0 &&
        ((struct icmphdr *)buf)->type == ICMP_ECHOREPLY)
        printf("ping %s reached\n", addr);
    else
        printf("ping %s blocked\n", addr);
    return 0;
}

static int packet_socket(const char *iface, struct sockaddr_ll *ll, unsigned char mac[6]) {
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (s < 0) { printf("packet %s\n", err()); exit(0); }
    struct ifreq ifr = {0};
    strncpy(ifr.ifr_name, iface, IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFINDEX, &ifr) < 0) { printf("ifindex %s\n", err()); exit(0); }
    memset(ll, 0, sizeof *ll);
    ll->sll_family = AF_PACKET;
    ll->sll_ifindex = ifr.ifr_ifindex;
    ll->sll_protocol = htons(ETH_P_ALL);
    if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0) { printf("hwaddr %s\n", err()); exit(0); }
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    return s;
}

static int garp(const char *iface, const char *addr, int n) {
    struct sockaddr_ll ll;
    unsigned char mac[6];
    int s = packet_socket(iface, &ll, mac);
    struct in_addr ip;
    if (inet_pton(AF_INET, addr, &ip) != 1) return 2;
    unsigned char f[42] = {0};
    memset(f, 0xff, 6);                       /* to everyone */
    memcpy(f + 6, mac, 6);                    /* from our own MAC, as a real attacker would */
    f[12] = 0x08; f[13] = 0x06;               /* ARP */
    f[14] = 0; f[15] = 1; f[16] = 8; f[17] = 0; f[18] = 6; f[19] = 4;
    f[20] = 0; f[21] = 2;                     /* reply */
    memcpy(f + 22, mac, 6);                   /* sender MAC: ours */
    memcpy(f + 28, &ip, 4);                   /* sender IP: the victim's */
    memset(f + 32, 0xff, 6);
    memcpy(f + 38, &ip, 4);
    int sent = 0;
    for (int i = 0; i < n; i++) {
        if (sendto(s, f, sizeof f, 0, (struct sockaddr *)&ll, sizeof ll) == sizeof f) sent++;
        f[21] = (i % 2) ? 2 : 1;              /* requests and replies alike */
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    printf("garp sent %d\n", sent);
    return 0;
}

static int sniff(const char *iface, const char *addr, int secs) {
    struct sockaddr_ll ll;
    unsigned char mac[6];
    int s = packet_socket(iface, &ll, mac);
    struct in_addr ip;
    if (inet_pton(AF_INET, addr, &ip) != 1) return 2;
    int seen = 0;
    time_t end = time(NULL) + secs;
    unsigned char buf[2048];
    while (time(NULL) < end) {
        struct pollfd pfd = {.fd = s, .events = POLLIN};
        if (poll(&pfd, 1, 200) != 1) continue;
        ssize_t len = recv(s, buf, sizeof buf, 0);
        if (len >= 34 && buf[12] == 0x08 && buf[13] == 0x00 && memcmp(buf + 30, &ip, 4) == 0)
            seen++;
    }
    printf("sniffed %d\n", seen);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc >= 2 && !strcmp(argv[1], "raw")) return raw();
    if (argc >= 3 && !strcmp(argv[1], "ping")) return ping(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "ptrace")) {
        long r = ptrace(PTRACE_ATTACH, atoi(argv[2]), 0, 0);
        printf("ptrace %s\n", r == 0 ? "ok" : err());
        return 0;
    }
    if (argc >= 5 && !strcmp(argv[1], "garp")) return garp(argv[2], argv[3], atoi(argv[4]));
    if (argc >= 5 && !strcmp(argv[1], "sniff")) return sniff(argv[2], argv[3], atoi(argv[4]));
    fprintf(stderr, "usage: probe raw|ping ADDR|ptrace PID|garp IFACE ADDR N|sniff IFACE ADDR SECS\n");
    return 2;
}
